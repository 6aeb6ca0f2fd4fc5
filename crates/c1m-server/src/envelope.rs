//! The envelope: a publication with its topic and position, for clients that asked
//! for one (and for `GET /history`), as one JSON text:
//!
//! ```text
//! {"topic":"prices","offset":42,"epoch":"9f2c01ab","data":{"eur":1.08}}
//! ```
//!
//! `data` is the payload itself when it is JSON, else the payload as a JSON string; a
//! binary payload goes in `data_base64` instead. `offset` and `epoch` are there only
//! for topics with history. Seed-style clients never see this: they get the bare
//! payload, as published.

use base64::Engine;
use bytes::Bytes;
use c1m_proto::frame::split_frame;
use c1m_proto::{encode_frame, OpCode};
use serde_json::{Map, Value};

use crate::history::Position;

/// Adds the payload of the encoded WebSocket `frame` to `object`, as `data` (JSON
/// or a string) or `data_base64` (binary).
pub fn put_payload(object: &mut Map<String, Value>, frame: &[u8]) {
    let Some((opcode, payload)) = split_frame(frame) else {
        return;
    };
    match (opcode, std::str::from_utf8(payload)) {
        (OpCode::Text, Ok(text)) => {
            let data = serde_json::from_str::<Value>(text)
                .unwrap_or_else(|_| Value::String(text.to_string()));
            object.insert("data".into(), data);
        }
        _ => {
            let encoded = base64::engine::general_purpose::STANDARD.encode(payload);
            object.insert("data_base64".into(), encoded.into());
        }
    }
}

/// The envelope of a publication of `frame` to `topic` (`None`: to every
/// connection), as a JSON object.
pub fn envelope(
    topic: Option<&str>,
    position: Option<(u64, &str)>,
    frame: &[u8],
) -> Map<String, Value> {
    let mut object = Map::new();
    if let Some(topic) = topic {
        object.insert("topic".into(), topic.into());
    }
    if let Some((offset, epoch)) = position {
        object.insert("offset".into(), offset.into());
        object.insert("epoch".into(), epoch.into());
    }
    put_payload(&mut object, frame);
    object
}

/// The envelope as a complete WebSocket text frame.
pub fn envelope_frame(topic: Option<&str>, position: Option<(u64, &str)>, frame: &[u8]) -> Bytes {
    let text = Value::Object(envelope(topic, position, frame)).to_string();
    let mut out = Vec::with_capacity(text.len() + 10);
    encode_frame(OpCode::Text, text.as_bytes(), None, &mut out);
    Bytes::from(out)
}

/// Where a topic stands, for answers: `{"offset":N,"epoch":"..."}` fields.
pub fn put_position(object: &mut Map<String, Value>, position: &Position) {
    object.insert("offset".into(), position.offset.into());
    object.insert("epoch".into(), position.epoch.as_str().into());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(opcode: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(opcode, payload, None, &mut out);
        out
    }

    #[test]
    fn json_payloads_go_in_as_json_text_as_strings_binary_as_base64() {
        let json = envelope(
            Some("a"),
            Some((3, "e")),
            &frame(OpCode::Text, br#"{"n":1}"#),
        );
        assert_eq!(
            Value::Object(json).to_string(),
            r#"{"data":{"n":1},"epoch":"e","offset":3,"topic":"a"}"#
        );
        let text = envelope(Some("a"), None, &frame(OpCode::Text, b"hello"));
        assert_eq!(
            Value::Object(text).to_string(),
            r#"{"data":"hello","topic":"a"}"#
        );
        let binary = envelope(None, None, &frame(OpCode::Binary, &[0xff, 0]));
        assert_eq!(
            Value::Object(binary).to_string(),
            r#"{"data_base64":"/wA="}"#
        );
    }

    #[test]
    fn the_frame_is_one_text_message() {
        let out = envelope_frame(Some("t"), Some((1, "x")), &frame(OpCode::Text, b"1"));
        let (opcode, payload) = split_frame(&out).unwrap();
        assert_eq!(opcode, OpCode::Text);
        assert_eq!(payload, br#"{"data":1,"epoch":"x","offset":1,"topic":"t"}"#);
    }
}
