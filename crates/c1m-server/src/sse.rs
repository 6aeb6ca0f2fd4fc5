//! Server-Sent Events: the same topics for clients and networks without WebSocket.
//!
//! `GET /sse?topic=…` (same query, token and `since` as an upgrade) is answered with a
//! `text/event-stream` that never ends; the connection is then an open connection like
//! a WebSocket one, with one flag bit telling the fan-out to send it events instead of
//! frames. Every publication is one event whose data is the envelope (one line: JSON
//! escapes newlines), and whose `id:` is its position `TOPIC:EPOCH:OFFSET` for topics
//! with history, so the browser's own reconnect sends it back as `Last-Event-ID` and
//! resumes (see `auth::Gate::admit_sse`). A publication without a position has no
//! `id:`, and the browser keeps the last one it had. Answers (a resume's `recovered`)
//! come as `event: answer`; a comment line every sweep keeps proxies from closing an
//! idle stream and finds dead peers.
//!
//! The encoding is written by hand: it is three line prefixes (no crate needed).

use bytes::Bytes;
use c1m_proto::frame::split_frame;
use c1m_proto::OpCode;

/// The path of the event stream.
pub const PATH: &str = "/sse";

/// A heartbeat: a comment line, ignored by every client. Sent every idle sweep: every
/// `--ping-interval` (30 s by default), else a quarter of `--idle-timeout`, else every
/// [`HEARTBEAT_EVERY`].
pub const HEARTBEAT: &[u8] = b":\n\n";

/// The heartbeat period when neither `--ping-interval` nor `--idle-timeout` is set
/// (below the 30 to 60 s after which proxies commonly close a silent response).
pub const HEARTBEAT_EVERY: std::time::Duration = std::time::Duration::from_secs(15);

/// Whether a request target asks for the event stream.
pub fn is_sse_target(target: &str) -> bool {
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    path == PATH || path == "/sse/"
}

/// The answer that opens the stream. `allow_origin` is the CORS answer for a page from
/// another origin (`EventSource` follows CORS: `*`, or the page's origin when
/// `--allowed-origins` let it in); the `retry:` line sets how long a browser waits
/// before it reconnects (1 s; its default is about 3 s).
pub fn response_head(allow_origin: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-store\r\n\
         X-Accel-Buffering: no\r\nAccess-Control-Allow-Origin: {allow_origin}\r\nVary: Origin\r\n\
         \r\nretry: 1000\n\n"
    )
    .into_bytes()
}

/// One event: an optional `event:` name and `id:`, and `data` (which must hold no
/// newline; every text this module is given is one line of JSON).
pub fn event(name: Option<&str>, id: Option<&str>, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + 64);
    if let Some(name) = name {
        out.extend_from_slice(b"event: ");
        out.extend_from_slice(name.as_bytes());
        out.push(b'\n');
    }
    if let Some(id) = id {
        out.extend_from_slice(b"id: ");
        out.extend_from_slice(id.as_bytes());
        out.push(b'\n');
    }
    // A payload line break would end the `data:` field; JSON from serde_json has none,
    // but the guard keeps the stream well-formed whatever it is handed.
    for (i, line) in data.split(|&b| b == b'\n').enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        out.extend_from_slice(b"data: ");
        out.extend_from_slice(line.strip_suffix(b"\r").unwrap_or(line));
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The `id:` of a publication at `offset` in `epoch` of `topic`: the same text as a
/// `since`, so it resumes as one.
pub fn position_id(topic: &str, epoch: &str, offset: u64) -> String {
    format!("{topic}:{epoch}:{offset}")
}

/// A publication's event, from its envelope frame (`envelope::envelope_frame`) and
/// its position: the envelope's JSON as `data`.
pub fn publication(envelope_frame: &[u8], id: Option<&str>) -> Bytes {
    let payload = split_frame(envelope_frame).map_or(&[][..], |(_, payload)| payload);
    event(None, id, payload)
}

/// An event for a WebSocket text frame meant for one client: an envelope (a recovered
/// publication: its `id:` is read back from its fields) or a command's answer.
pub fn from_text_frame(frame: &[u8]) -> Bytes {
    let Some((OpCode::Text, payload)) = split_frame(frame) else {
        return Bytes::new();
    };
    let value: serde_json::Value = serde_json::from_slice(payload).unwrap_or_default();
    if value.get("op").is_some() {
        return event(Some("answer"), None, payload);
    }
    let id = match (
        value.get("topic").and_then(|t| t.as_str()),
        value.get("epoch").and_then(|e| e.as_str()),
        value.get("offset").and_then(|o| o.as_u64()),
    ) {
        (Some(topic), Some(epoch), Some(offset)) => Some(position_id(topic, epoch, offset)),
        _ => None,
    };
    event(None, id.as_deref(), payload)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::envelope_frame;
    use c1m_proto::encode_frame;

    fn text(payload: &str) -> Vec<u8> {
        let mut out = Vec::new();
        encode_frame(OpCode::Text, payload.as_bytes(), None, &mut out);
        out
    }

    #[test]
    fn a_publication_is_its_envelope_with_its_position_as_id() {
        let frame = envelope_frame(Some("prices"), Some((42, "9f2c01ab")), &text("1.08"));
        let id = position_id("prices", "9f2c01ab", 42);
        assert_eq!(
            &publication(&frame, Some(&id))[..],
            b"id: prices:9f2c01ab:42\ndata: {\"data\":1.08,\"epoch\":\"9f2c01ab\",\"offset\":42,\"topic\":\"prices\"}\n\n"
        );
        assert_eq!(from_text_frame(&frame), publication(&frame, Some(&id)));
        let bare = envelope_frame(Some("news"), None, &text("\"hi\""));
        assert_eq!(
            &from_text_frame(&bare)[..],
            b"data: {\"data\":\"hi\",\"topic\":\"news\"}\n\n"
        );
    }

    #[test]
    fn answers_are_named_and_line_breaks_cannot_end_an_event_early() {
        assert_eq!(
            &from_text_frame(&text(r#"{"ok":true,"op":"subscribe","recovered":true}"#))[..],
            b"event: answer\ndata: {\"ok\":true,\"op\":\"subscribe\",\"recovered\":true}\n\n"
        );
        assert_eq!(&event(None, None, b"a\r\nb")[..], b"data: a\ndata: b\n\n");
        assert!(from_text_frame(b"\x88\x00").is_empty(), "not a text frame");
    }

    #[test]
    fn the_stream_path_and_its_head() {
        assert!(is_sse_target("/sse?topic=a") && is_sse_target("/sse"));
        assert!(!is_sse_target("/ssex") && !is_sse_target("/topics/sse"));
        let head = String::from_utf8(response_head("https://a.example")).unwrap();
        assert!(head.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"));
        assert!(head.contains("Access-Control-Allow-Origin: https://a.example\r\n"));
        assert!(head.ends_with("\r\n\r\nretry: 1000\n\n"));
    }
}
