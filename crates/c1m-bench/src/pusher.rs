//! How a bench connection speaks the Pusher protocol (`c1m bench --pusher-channel`):
//! which channel it subscribes to, and for private and presence channels the
//! signature the app's auth endpoint would give it.
//!
//! The signature needs the socket id the server sends first
//! (`pusher:connection_established`), so a connection that must sign subscribes when
//! that arrives; one to a public channel subscribes right after its upgrade.

use serde_json::{json, Value};

/// The Pusher side of a bench run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PusherPlan {
    /// The channel, or the stem of `channels` channels (`STEM-0`, `STEM-1`, …).
    pub channel: String,
    /// How many channels the connections spread over (connection `i` takes
    /// `i % channels`); 1: all on `channel`.
    pub channels: u32,
    /// The app's key (from the URL's `/app/KEY`).
    pub key: String,
    /// The app's secret, to sign private and presence subscriptions.
    pub secret: Option<String>,
}

impl PusherPlan {
    /// The channel of connection `index`.
    pub fn channel_for(&self, index: usize) -> String {
        if self.channels <= 1 {
            self.channel.clone()
        } else {
            format!(
                "{}-{}",
                self.channel,
                index as u64 % u64::from(self.channels)
            )
        }
    }

    /// Whether subscribing takes a signature (and so the socket id first).
    pub fn signs(&self) -> bool {
        self.secret.is_some()
            && (self.channel.starts_with("private-") || self.channel.starts_with("presence-"))
    }

    /// Connection `index`'s `pusher:subscribe`; signed when the plan has a secret and
    /// the socket id is known (on a presence channel as a user named by the socket id:
    /// one member per connection, across worker processes too).
    pub fn subscribe(&self, index: usize, socket_id: Option<&str>) -> String {
        let channel = self.channel_for(index);
        let mut data = json!({ "channel": channel });
        if let (Some(secret), Some(socket_id)) = (&self.secret, socket_id) {
            let channel_data = channel
                .starts_with("presence-")
                .then(|| json!({ "user_id": socket_id }).to_string());
            let mut signed = format!("{socket_id}:{channel}");
            if let Some(channel_data) = &channel_data {
                signed.push(':');
                signed.push_str(channel_data);
                data["channel_data"] = Value::String(channel_data.clone());
            }
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
            let signature = hex::encode(ring::hmac::sign(&key, signed.as_bytes()));
            data["auth"] = Value::String(format!("{}:{signature}", self.key));
        }
        json!({ "event": "pusher:subscribe", "data": data }).to_string()
    }
}

/// The socket id in a `pusher:connection_established` message, if that is what
/// `payload` is.
pub fn socket_id(payload: &[u8]) -> Option<String> {
    const EVENT: &[u8] = b"pusher:connection_established";
    if payload.len() > 1024 || !payload.windows(EVENT.len()).any(|w| w == EVENT) {
        return None;
    }
    let message: Value = serde_json::from_slice(payload).ok()?;
    let data: Value = serde_json::from_str(message.get("data")?.as_str()?).ok()?;
    Some(data.get("socket_id")?.as_str()?.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_subscriptions_are_signed_over_their_channel_data() {
        let plan = PusherPlan {
            channel: "presence-room".into(),
            channels: 3,
            key: "k".into(),
            secret: Some("s".into()),
        };
        assert!(plan.signs());
        assert_eq!(plan.channel_for(4), "presence-room-1");
        let message: Value = serde_json::from_str(&plan.subscribe(4, Some("1.2"))).unwrap();
        let data = &message["data"];
        assert_eq!(data["channel_data"], r#"{"user_id":"1.2"}"#);
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"s");
        let expected = hex::encode(ring::hmac::sign(
            &key,
            br#"1.2:presence-room-1:{"user_id":"1.2"}"#,
        ));
        assert_eq!(data["auth"], format!("k:{expected}"));
    }

    #[test]
    fn the_socket_id_is_read_from_the_first_message() {
        let hello = r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"7.9\",\"activity_timeout\":120}"}"#;
        assert_eq!(socket_id(hello.as_bytes()).as_deref(), Some("7.9"));
        assert_eq!(socket_id(br#"{"event":"x","data":"{}"}"#), None);
    }
}
