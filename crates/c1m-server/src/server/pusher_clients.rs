//! Pusher clients (`/app/{key}`, see `pusher`): what the server does with their
//! messages, and the signed HTTP API's events.
//!
//! A Pusher connection is an ordinary open connection with its protocol set: channels
//! are topics (a native client of the topic gets the same events), and the fan-out
//! gives it Pusher events (`fanout.rs`). Public channels, and private and
//! private-encrypted ones with the app's signature (the server never decrypts); a
//! presence channel is refused with `pusher:subscription_error` (not served yet), and
//! client events with error 4301.

use std::time::Instant;

use c1m_proto::CloseCode;

use crate::connection::{Next, Protocol};
use crate::pusher::{self, ChannelKind, ClientMessage, Trigger};
use crate::target::Target;
use crate::topics::validate_name;
use crate::upstream::{Upstream, Waiting};

use super::delivery::WhenDelivered;
use super::Server;

impl Server {
    /// A Pusher client's upgrade went through: it is told its socket id, or that its
    /// key names no app here (error 4001, then closed with 4001, as Pusher does).
    pub(super) fn pusher_opened(&mut self, key: usize, known_app: bool, now: Instant) -> Next {
        self.registry.conns[key].set_protocol(Protocol::Pusher);
        self.registry.counters.pusher_opened += 1;
        if !known_app {
            let error = pusher::error(pusher::code::UNKNOWN_APP, "App key not in this server");
            let next = self.reply(key, &error);
            if next == Next::Keep {
                let code = CloseCode(pusher::code::UNKNOWN_APP);
                self.registry.close_open(key, code, "unknown app key", now);
            }
            return next;
        }
        let socket_id = pusher::socket_id(key);
        self.reply(key, &pusher::connection_established(&socket_id))
    }

    /// A Pusher client's message.
    pub(super) fn pusher_message(&mut self, key: usize, text: &str) -> Next {
        let message = match ClientMessage::parse(text) {
            Ok(message) => message,
            Err(answer) => return self.reply(key, &answer),
        };
        let answer = match message {
            ClientMessage::Ping => pusher::pong(),
            ClientMessage::Pong => return Next::Keep,
            ClientMessage::Subscribe { channel, auth } => {
                match self.pusher_subscribe(key, &channel, auth.as_deref()) {
                    Ok(answer) => answer,
                    Err(refusal) => {
                        self.registry.counters.pusher_subscriptions_refused += 1;
                        refusal
                    }
                }
            }
            ClientMessage::Unsubscribe { channel } => {
                if let Some(id) = self.registry.topics.id(&channel) {
                    self.registry.unsubscribe(key, id);
                }
                return Next::Keep;
            }
            ClientMessage::ClientEvent { .. } => pusher::error(
                pusher::code::GENERIC,
                "client events are not enabled for this app",
            ),
            ClientMessage::Unknown(event) => pusher::error(
                pusher::code::GENERIC,
                &format!("unsupported event {event:?}"),
            ),
        };
        self.reply(key, &answer)
    }

    /// `pusher:subscribe`: a public channel is joined at once, a private one with the
    /// app's signature of this socket and channel. `Err`: the subscription error to send.
    fn pusher_subscribe(
        &mut self,
        key: usize,
        channel: &str,
        auth: Option<&str>,
    ) -> Result<String, String> {
        if let Err(error) = validate_name(channel) {
            return Err(pusher::subscription_error(
                channel,
                400,
                &format!("bad channel name: {error}"),
            ));
        }
        match pusher::channel_kind(channel) {
            ChannelKind::Public => {}
            ChannelKind::Private | ChannelKind::Encrypted => {
                let socket_id = pusher::socket_id(key);
                let signed = self.config.pusher_apps.first().is_some_and(|app| {
                    auth.is_some_and(|auth| pusher::channel_auth_ok(app, &socket_id, channel, auth))
                });
                if !signed {
                    return Err(pusher::subscription_error(
                        channel,
                        401,
                        "invalid signature: auth must be KEY:HMAC-SHA256(secret, \"SOCKET_ID:CHANNEL\")",
                    ));
                }
            }
            ChannelKind::Presence => {
                return Err(pusher::subscription_error(
                    channel,
                    403,
                    "presence channels are not served here yet",
                ))
            }
        }
        let registry = &mut self.registry;
        let conn = &registry.conns[key];
        let already = registry
            .topics
            .id(channel)
            .is_some_and(|id| conn.is_subscribed(id));
        if !already {
            if conn.subscription_count() >= self.config.max_topics_per_connection {
                return Err(pusher::subscription_error(
                    channel,
                    400,
                    &format!(
                        "at most {} channels per connection",
                        self.config.max_topics_per_connection
                    ),
                ));
            }
            registry.subscribe(key, channel);
        }
        Ok(pusher::subscription_succeeded(channel))
    }

    /// `POST /apps/{id}/events` or `/batch_events`, signature checked: each event goes
    /// to each of its channels as a publication (one frame per channel, the same for
    /// native and Pusher clients), and the request is answered at once with `{}`, as
    /// Pusher does (delivery is not awaited). `Err` is the answer when it cannot be taken now.
    pub(super) fn pusher_trigger(
        &mut self,
        triggers: Vec<Trigger>,
        now: Instant,
    ) -> Result<(), Vec<u8>> {
        if self.upstream.cluster_up() == Some(false) {
            return Err(crate::http::broker_refusal());
        }
        if matches!(self.upstream, Upstream::Local) && !self.publications.has_room() {
            self.registry.counters.publishes_refused_busy += 1;
            return Err(crate::http::fan_out_busy());
        }
        let events = triggers
            .iter()
            .flat_map(|t| t.channels.iter().map(move |channel| (t, channel)));
        for (trigger, channel) in events {
            let frame = pusher::text_frame(&pusher::event(&trigger.name, channel, &trigger.data));
            let target = Target::Topic(channel.clone());
            self.registry.counters.pusher_api_events += 1;
            // Nobody waits for the count: `Waiting::nobody` answers no connection.
            if matches!(self.upstream, Upstream::Local) {
                let position = self.keep_in_history(&target, &frame, now);
                self.publish_excluding(
                    target,
                    frame,
                    position,
                    trigger.socket_id,
                    WhenDelivered::Answer(Waiting::nobody(now)),
                );
            } else {
                let target = (target, trigger.socket_id);
                self.publish_upstream(Waiting::nobody(now), target, frame.to_vec(), now)?;
            }
        }
        Ok(())
    }
}
