//! The client's text protocol: joining and leaving topics after connecting.
//!
//! A client sends a JSON text message:
//!
//! ```text
//! {"op": "subscribe", "topic": "prices"}
//! {"op": "unsubscribe", "topic": "prices"}
//! ```
//!
//! and gets one answer per command, `{"ok":true,"op":"subscribe","topic":"prices"}` or
//! `{"ok":false,"op":...,"topic":...,"error":"..."}`. Published messages are delivered as
//! published, without an envelope, so a seed-style client sees exactly the payload.

use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Subscribe(String),
    Unsubscribe(String),
    /// `{"op":"refresh","token":"..."}`: a fresh JWT, so the connection outlives the
    /// token it connected with (it is closed with 4001 at that token's expiry
    /// otherwise). Answered `{"ok":true,"op":"refresh","exp":N}` or with an error.
    Refresh(String),
}

#[derive(Deserialize)]
struct Wire {
    op: String,
    topic: Option<String>,
    token: Option<String>,
}

/// Whether a client's text message is meant as a command: a JSON object. Other text
/// is ignored without an answer, as the seed's servers ignored what clients sent.
pub fn is_command(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Reads a command; `Err` holds the error answer to send back.
pub fn parse(text: &str) -> Result<Command, String> {
    let wire: Wire = serde_json::from_str(text).map_err(|_| malformed_reply())?;
    match (wire.op.as_str(), wire.topic, wire.token) {
        ("subscribe", Some(topic), _) => Ok(Command::Subscribe(topic)),
        ("unsubscribe", Some(topic), _) => Ok(Command::Unsubscribe(topic)),
        ("refresh", _, Some(token)) => Ok(Command::Refresh(token)),
        ("refresh", _, None) => Err(refresh_reply(Err("missing \"token\""))),
        ("subscribe" | "unsubscribe", None, _) => Err(malformed_reply()),
        (other, topic, _) => Err(error_reply(Some(other), topic.as_deref(), "unknown op")),
    }
}

/// The answer to a text message that is not a well-formed command (or too long to be
/// one).
pub fn malformed_reply() -> String {
    error_reply(
        None,
        None,
        "expected {\"op\":\"subscribe\"|\"unsubscribe\",\"topic\":NAME}",
    )
}

/// The answer to a refresh: the new expiry (Unix seconds), or why it was refused.
pub fn refresh_reply(result: Result<Option<u64>, &str>) -> String {
    match result {
        Ok(exp) => json!({"ok": true, "op": "refresh", "exp": exp}).to_string(),
        Err(error) => json!({"ok": false, "op": "refresh", "error": error}).to_string(),
    }
}

pub fn ok_reply(op: &str, topic: &str) -> String {
    json!({"ok": true, "op": op, "topic": topic}).to_string()
}

pub fn error_reply(op: Option<&str>, topic: Option<&str>, error: &str) -> String {
    json!({"ok": false, "op": op, "topic": topic, "error": error}).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_ops_and_explains_the_rest() {
        assert_eq!(
            parse(r#"{"op":"subscribe","topic":"a"}"#),
            Ok(Command::Subscribe("a".into()))
        );
        assert_eq!(
            parse(r#"{"topic":"a","op":"unsubscribe"}"#),
            Ok(Command::Unsubscribe("a".into()))
        );
        assert_eq!(
            parse(r#"{"op":"refresh","token":"t"}"#),
            Ok(Command::Refresh("t".into()))
        );
        assert!(is_command(" {\"op\":1}") && !is_command("hello"));
        for bad in [
            "",
            "hello",
            "{}",
            r#"{"op":"subscribe"}"#,
            r#"{"op":"x","topic":"a"}"#,
            r#"{"op":"refresh"}"#,
            r#"{"op":"refresh","token":7}"#,
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("\"ok\":false"), "{bad}: {err}");
        }
    }
}
