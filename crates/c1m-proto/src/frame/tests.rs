use super::*;
use proptest::prelude::*;

const KEY: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn server() -> Decoder {
    Decoder::new(DecoderConfig {
        role: Role::Server,
        max_message_size: 1 << 20,
        compression: false,
    })
}

/// A decoded event with owned data, so tests can collect and compare them.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Owned {
    Message { text: bool, payload: Vec<u8> },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<u16>, String),
}

/// Feeds `bytes` to a server decoder in pieces cut at `cuts`, reassembling messages.
fn decode_split(bytes: &[u8], cuts: &[usize]) -> Result<Vec<Owned>, ProtocolError> {
    let mut decoder = server();
    let mut events = Vec::new();
    let mut message: Option<(bool, Vec<u8>)> = None;
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (bytes.len() + 1)).collect();
    points.push(bytes.len());
    points.sort_unstable();
    let mut start = 0;
    for p in points {
        let mut piece = bytes[start..p].to_vec();
        start = p;
        decoder.decode(&mut piece, |event| match event {
            Event::Data {
                text,
                payload,
                message_end,
                ..
            } => {
                let m = message.get_or_insert_with(|| (text, Vec::new()));
                m.1.extend_from_slice(payload);
                if message_end {
                    let (text, payload) = message.take().unwrap();
                    events.push(Owned::Message { text, payload });
                }
            }
            Event::Ping(p) => events.push(Owned::Ping(p.to_vec())),
            Event::Pong(p) => events.push(Owned::Pong(p.to_vec())),
            Event::Close { code, reason } => {
                events.push(Owned::Close(code.map(|c| c.0), reason.to_string()))
            }
        })?;
    }
    Ok(events)
}

fn decode(bytes: &[u8]) -> Result<Vec<Owned>, ProtocolError> {
    decode_split(bytes, &[])
}

fn masked(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(opcode, payload, Some(KEY), &mut out);
    out
}

/// A raw frame with explicit FIN bit, masked with KEY.
fn raw_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(OpCode::Binary, payload, Some(KEY), &mut out);
    out[0] = first_byte;
    out
}

#[test]
fn encodes_the_three_length_forms() {
    for (len, header) in [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)] {
        let mut out = Vec::new();
        encode_frame(OpCode::Text, &vec![b'a'; len], None, &mut out);
        assert_eq!(out.len(), header + len, "len {len}");
        assert_eq!(header_len(len, false), header);
    }
}

#[test]
fn unmasked_server_frame_matches_rfc_example() {
    // RFC 6455 §5.7: a single-frame unmasked text message "Hello".
    let mut out = Vec::new();
    encode_frame(OpCode::Text, b"Hello", None, &mut out);
    assert_eq!(out, [0x81, 0x05, 0x48, 0x65, 0x6c, 0x6c, 0x6f]);
}

#[test]
fn decodes_rfc_masked_example() {
    // RFC 6455 §5.7: a single-frame masked text message "Hello".
    let bytes = [
        0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d, 0x7f, 0x9f, 0x4d, 0x51, 0x58,
    ];
    assert_eq!(
        decode(&bytes).unwrap(),
        vec![Owned::Message {
            text: true,
            payload: b"Hello".to_vec()
        }]
    );
}

#[test]
fn reassembles_fragments_with_interleaved_ping() {
    let mut bytes = raw_frame(0x01, b"Hel"); // text, not FIN
    bytes.extend(masked(OpCode::Ping, b"p"));
    bytes.extend(raw_frame(0x80, b"lo")); // continuation, FIN
    assert_eq!(
        decode(&bytes).unwrap(),
        vec![
            Owned::Ping(b"p".to_vec()),
            Owned::Message {
                text: true,
                payload: b"Hello".to_vec()
            }
        ]
    );
}

#[test]
fn close_frames_are_parsed_and_validated() {
    let payload = close_payload(CloseCode::NORMAL, "bye");
    assert_eq!(
        decode(&masked(OpCode::Close, &payload)).unwrap(),
        vec![Owned::Close(Some(1000), "bye".into())]
    );
    assert_eq!(
        decode(&masked(OpCode::Close, &[])).unwrap(),
        vec![Owned::Close(None, String::new())]
    );
    assert_eq!(
        decode(&masked(OpCode::Close, &[3])),
        Err(ProtocolError::CloseTooShort)
    );
    assert_eq!(
        decode(&masked(OpCode::Close, &[0x03, 0xED])),
        Err(ProtocolError::InvalidCloseCode(1005))
    );
    assert_eq!(
        decode(&masked(OpCode::Close, &[0x03, 0xE8, 0xFF])),
        Err(ProtocolError::InvalidUtf8)
    );
}

#[test]
fn long_close_reason_is_trimmed_on_a_char_boundary() {
    let payload = close_payload(CloseCode::NORMAL, &"é".repeat(100));
    assert!(payload.len() <= MAX_CONTROL_PAYLOAD);
    assert!(std::str::from_utf8(&payload[2..]).is_ok());
}

#[test]
fn nothing_is_accepted_after_close() {
    let mut bytes = masked(OpCode::Close, &[]);
    bytes.extend(masked(OpCode::Text, b"late"));
    assert_eq!(decode(&bytes), Err(ProtocolError::DataAfterClose));
}

#[test]
fn protocol_violations_get_their_close_codes() {
    let cases: Vec<(Vec<u8>, ProtocolError, u16)> = vec![
        (
            raw_frame(0x81 | 0x40, b"x"),
            ProtocolError::ReservedBits,
            1002,
        ),
        (
            raw_frame(0x83, b"x"),
            ProtocolError::ReservedOpcode(3),
            1002,
        ),
        (
            raw_frame(0x8B, b"x"),
            ProtocolError::ReservedOpcode(0xB),
            1002,
        ),
        (
            {
                let mut f = Vec::new();
                encode_frame(OpCode::Text, b"x", None, &mut f);
                f
            },
            ProtocolError::UnmaskedFrame,
            1002,
        ),
        (
            raw_frame(0x09, b"x"),
            ProtocolError::FragmentedControl,
            1002,
        ),
        (
            masked(OpCode::Ping, &[0; 126]),
            ProtocolError::ControlTooLong(126),
            1002,
        ),
        (
            raw_frame(0x80, b"x"),
            ProtocolError::UnexpectedContinuation,
            1002,
        ),
        (
            [raw_frame(0x01, b"a"), raw_frame(0x81, b"b")].concat(),
            ProtocolError::ExpectedContinuation,
            1002,
        ),
        (
            masked(OpCode::Text, &[0xC0, 0xAF]),
            ProtocolError::InvalidUtf8,
            1007,
        ),
        (
            masked(OpCode::Binary, &vec![0; (1 << 20) + 1]),
            ProtocolError::MessageTooBig { limit: 1 << 20 },
            1009,
        ),
    ];
    for (bytes, error, code) in cases {
        assert_eq!(decode(&bytes), Err(error.clone()), "{error}");
        assert_eq!(error.close_code().0, code);
    }
}

#[test]
fn huge_announced_length_fails_from_the_header_alone() {
    // A header announcing 2^62 bytes must be rejected without waiting for (or
    // allocating) the payload; 2^63 is malformed.
    let mut header = vec![0x82, 0xFF];
    header.extend_from_slice(&(1u64 << 62).to_be_bytes());
    header.extend_from_slice(&KEY);
    assert_eq!(
        decode(&header),
        Err(ProtocolError::MessageTooBig { limit: 1 << 20 })
    );
    header[2] = 0x80;
    assert_eq!(decode(&header), Err(ProtocolError::LengthOverflow));
}

#[test]
fn fragments_adding_up_past_the_limit_are_rejected() {
    let mut d = Decoder::new(DecoderConfig {
        role: Role::Server,
        max_message_size: 10,
        compression: false,
    });
    let mut bytes = raw_frame(0x02, &[0; 6]);
    bytes.extend(raw_frame(0x80, &[0; 6]));
    assert_eq!(
        d.decode(&mut bytes, |_| {}),
        Err(ProtocolError::MessageTooBig { limit: 10 })
    );
}

#[test]
fn client_role_rejects_masked_frames_and_reads_plain_ones() {
    let mut d = Decoder::new(DecoderConfig {
        role: Role::Client,
        max_message_size: 100,
        compression: false,
    });
    let mut plain = Vec::new();
    encode_frame(OpCode::Text, b"1700000000000", None, &mut plain);
    let mut got = Vec::new();
    d.decode(&mut plain, |e| {
        if let Event::Data { payload, .. } = e {
            got.extend_from_slice(payload)
        }
    })
    .unwrap();
    assert_eq!(got, b"1700000000000");
    let mut m = masked(OpCode::Text, b"x");
    assert_eq!(d.decode(&mut m, |_| {}), Err(ProtocolError::MaskedFrame));
}

#[test]
fn idle_only_between_messages() {
    let mut d = server();
    assert!(d.is_idle());
    let mut first = raw_frame(0x01, b"ab");
    d.decode(&mut first[..3], |_| {}).unwrap();
    assert!(!d.is_idle());
    d.decode(&mut first[3..], |_| {}).unwrap();
    assert!(!d.is_idle(), "message is not finished");
    let mut last = raw_frame(0x80, b"c");
    d.decode(&mut last, |_| {}).unwrap();
    assert!(d.is_idle());
}

fn arb_frame() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        "\\PC{0,50}".prop_map(|s| masked(OpCode::Text, s.as_bytes())),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|b| masked(OpCode::Binary, &b)),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(|b| masked(OpCode::Ping, &b)),
        proptest::collection::vec(any::<u8>(), 0..125).prop_map(|b| masked(OpCode::Pong, &b)),
    ]
}

proptest! {
    #[test]
    fn any_split_decodes_the_same(frames in proptest::collection::vec(arb_frame(), 1..8),
                                  cuts in proptest::collection::vec(any::<usize>(), 0..10)) {
        let bytes = frames.concat();
        let whole = decode(&bytes).unwrap();
        prop_assert_eq!(whole.len(), frames.len());
        prop_assert_eq!(decode_split(&bytes, &cuts).unwrap(), whole);
    }

    #[test]
    fn hostile_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512),
                                 cuts in proptest::collection::vec(any::<usize>(), 0..5)) {
        let _ = decode_split(&bytes, &cuts);
    }

    #[test]
    fn mask_offset_is_consistent(data in proptest::collection::vec(any::<u8>(), 0..64), split in 0usize..64) {
        let split = split.min(data.len());
        let mut whole = data.clone();
        apply_mask(&mut whole, KEY, 0);
        let mut pieces = data.clone();
        apply_mask(&mut pieces[..split], KEY, 0);
        apply_mask(&mut pieces[split..], KEY, split);
        prop_assert_eq!(whole, pieces);
    }
}
