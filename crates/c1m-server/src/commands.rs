//! The client's text protocol: joining and leaving topics after connecting.
//!
//! A client sends a JSON text message:
//!
//! ```text
//! {"op": "subscribe", "topic": "prices"}
//! {"op": "subscribe", "topic": "prices", "since": {"offset": 41, "epoch": "9f2c01ab"}}
//! {"op": "unsubscribe", "topic": "prices"}
//! ```
//!
//! and gets one answer per command, `{"ok":true,"op":"subscribe","topic":"prices"}` or
//! `{"ok":false,"op":...,"topic":...,"error":"..."}`. Published messages are delivered as
//! published, without an envelope, so a seed-style client sees exactly the payload;
//! unless it asked for envelopes (`?envelope=1` at connect, or any `since`), which carry
//! the topic and, for a topic with history, the position. A subscribe with `since`
//! (the last position the client saw) resumes: the answer says `"recovered": true` and
//! the missed publications follow it, in order, before live ones; or `false` with a
//! `reason` (see `history::NotRecovered`), and the client reloads. Either way the answer
//! carries the topic's position (`offset`, `epoch`) when it has history.

use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Subscribe {
        topic: String,
        /// The last position the client saw: (offset, epoch).
        since: Option<(u64, String)>,
    },
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
    since: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Since {
    offset: u64,
    epoch: String,
}

/// What `since` must look like, for error answers.
const SINCE_SHAPE: &str = "since must be {\"offset\":N,\"epoch\":\"...\"}, N a whole number ≥ 0";

/// Whether a client's text message is meant as a command: a JSON object. Other text
/// is ignored without an answer, as the seed's servers ignored what clients sent.
pub fn is_command(text: &str) -> bool {
    text.trim_start().starts_with('{')
}

/// Reads a command; `Err` holds the error answer to send back.
pub fn parse(text: &str) -> Result<Command, String> {
    let wire: Wire = serde_json::from_str(text).map_err(|_| malformed_reply())?;
    let since = match (wire.since, wire.op.as_str()) {
        (None, _) => None,
        (Some(value), "subscribe") => match serde_json::from_value::<Since>(value) {
            Ok(s) if s.epoch.len() <= 64 => Some((s.offset, s.epoch)),
            _ => {
                return Err(error_reply(
                    Some("subscribe"),
                    wire.topic.as_deref(),
                    SINCE_SHAPE,
                ))
            }
        },
        (Some(_), op) => {
            return Err(error_reply(
                Some(op),
                wire.topic.as_deref(),
                "since goes with subscribe only",
            ))
        }
    };
    match (wire.op.as_str(), wire.topic, wire.token) {
        ("subscribe", Some(topic), _) => Ok(Command::Subscribe { topic, since }),
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

/// An `ok` answer with more fields (a subscribe's `recovered`, `offset`, ...).
pub fn ok_reply_with(
    op: &str,
    topic: &str,
    mut fields: serde_json::Map<String, serde_json::Value>,
) -> String {
    fields.insert("ok".into(), true.into());
    fields.insert("op".into(), op.into());
    fields.insert("topic".into(), topic.into());
    serde_json::Value::Object(fields).to_string()
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
            Ok(Command::Subscribe {
                topic: "a".into(),
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"op":"subscribe","topic":"a","since":{"offset":4,"epoch":"e"}}"#),
            Ok(Command::Subscribe {
                topic: "a".into(),
                since: Some((4, "e".into()))
            })
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
            r#"{"op":"subscribe","topic":"a","since":5}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":-1,"epoch":"e"}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":1e30,"epoch":"e"}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":1}}"#,
            r#"{"op":"subscribe","topic":"a","since":{"offset":1,"epoch":"e","x":1}}"#,
            r#"{"op":"unsubscribe","topic":"a","since":{"offset":1,"epoch":"e"}}"#,
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains("\"ok\":false"), "{bad}: {err}");
        }
    }
}
