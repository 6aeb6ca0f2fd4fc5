//! An echo client for the Autobahn|Testsuite "fuzzingserver" mode, built on c1m-proto's
//! client side (the same handshake and decoder code `c1m bench` uses). Blocking I/O: it
//! checks protocol behaviour, not speed.
//!
//!   cargo run --example autobahn_client -p c1m-proto -- 127.0.0.1:9001 [AGENT]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use c1m_proto::frame::{close_payload, encode_frame};
use c1m_proto::handshake::{client_key, client_request, parse_response};
use c1m_proto::{Decoder, DecoderConfig, Event, OpCode, Role};

/// A mask key per frame; a fixed sequence is enough for a conformance run.
fn mask(counter: &mut u32) -> [u8; 4] {
    *counter = counter.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
    counter.to_be_bytes()
}

/// Connects to `path`, echoes every message until the server closes; returns the text
/// messages received (for `getCaseCount`).
fn run(addr: &str, path: &str) -> std::io::Result<Vec<String>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let key = client_key(*b"c1m-autobahn-key");
    stream.write_all(&client_request(addr, path, &key))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    let used = loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(Vec::new());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse_response(&buf, &key, 16 * 1024) {
            Ok(Some(used)) => break used,
            Ok(None) => continue,
            Err(e) => return Err(std::io::Error::other(e.to_string())),
        }
    };
    let mut pending: Vec<u8> = buf.split_off(used);
    let mut decoder = Decoder::new(DecoderConfig {
        role: Role::Client,
        max_message_size: 64 << 20,
        compression: false,
    });
    let mut message: Vec<u8> = Vec::new();
    let mut texts = Vec::new();
    let mut counter = 1u32;
    loop {
        let mut out = Vec::new();
        let mut done = false;
        let result = decoder.decode(&mut pending, |event| match event {
            Event::Data {
                text,
                payload,
                message_end,
                ..
            } => {
                message.extend_from_slice(payload);
                if message_end {
                    let opcode = if text { OpCode::Text } else { OpCode::Binary };
                    if text {
                        texts.push(String::from_utf8_lossy(&message).into_owned());
                    }
                    encode_frame(opcode, &message, Some(mask(&mut counter)), &mut out);
                    message.clear();
                }
            }
            Event::Ping(p) => encode_frame(OpCode::Pong, p, Some(mask(&mut counter)), &mut out),
            Event::Pong(_) => {}
            Event::Close { code, .. } => {
                let payload = code.map(|c| c.0.to_be_bytes().to_vec()).unwrap_or_default();
                encode_frame(OpCode::Close, &payload, Some(mask(&mut counter)), &mut out);
                done = true;
            }
        });
        if let Err(error) = result {
            encode_frame(
                OpCode::Close,
                &close_payload(error.close_code(), ""),
                Some(mask(&mut counter)),
                &mut out,
            );
            done = true;
        }
        stream.write_all(&out)?;
        if done {
            // Wait for the server to close the TCP connection.
            while matches!(stream.read(&mut chunk), Ok(n) if n > 0) {}
            return Ok(texts);
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(texts);
        }
        pending = chunk[..n].to_vec();
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:9001".into());
    let agent = args.next().unwrap_or_else(|| "c1m".into());
    // The fuzzing server may say "listening" a moment before it answers: retry briefly.
    let mut attempts = 0;
    let texts = loop {
        match run(&addr, "/getCaseCount") {
            Ok(texts) if !texts.is_empty() => break texts,
            result if attempts < 50 => {
                attempts += 1;
                if let Err(e) = result {
                    eprintln!("getCaseCount: {e}; retrying");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            result => break result?,
        }
    };
    let count: u32 = texts
        .first()
        .and_then(|t| t.trim().parse().ok())
        .ok_or_else(|| std::io::Error::other("no case count from the fuzzing server"))?;
    eprintln!("running {count} cases");
    for case in 1..=count {
        if let Err(e) = run(&addr, &format!("/runCase?case={case}&agent={agent}")) {
            eprintln!("case {case}: {e}");
        }
    }
    run(&addr, &format!("/updateReports?agent={agent}"))?;
    Ok(())
}
