//! Pusher clients (`/app/{key}`, see `pusher`): what the server does with their
//! messages (subscriptions, sign-in, client events) and with the signed HTTP API's
//! events, reads and terminations.
//!
//! A Pusher connection is an ordinary open connection whose protocol byte names its
//! app: channels are topics (the first app's shared with native clients, the others'
//! namespaced, `pusher::topic_of`), and the fan-out gives it Pusher events
//! (`fanout.rs`). Public channels; private and private-encrypted ones with the app's
//! signature (the server never decrypts); presence channels with a signed
//! `channel_data` (`server/pusher_presence.rs`); client events (`client-*`) on private
//! and presence channels when the app allows them; the user's own channel after a
//! sign-in.

use std::time::{Duration, Instant};

use c1m_proto::CloseCode;
use serde_json::Value;

use crate::auth::PusherEntry;
use crate::connection::{Next, PhaseKind};
use crate::control::Message;
use crate::presence::Member;
use crate::pusher::{self, ChannelKind, ClientMessage, SocketRef, Trigger};
use crate::target::Target;
use crate::upstream::{Upstream, Waiting};

use super::delivery::WhenDelivered;
use super::pusher_presence::Joining;
use super::Server;

/// Largest client event `data` (Pusher's limit: 10 KB).
pub const MAX_CLIENT_EVENT_BYTES: usize = 10 * 1024;

impl Server {
    /// A Pusher client's upgrade went through: it is told its socket id, or why it
    /// may not stay (as Pusher does: a `pusher:error`, then a close with its code):
    /// its key names no app here (4001), its app is at its `max_connections` (4004),
    /// it asks for a protocol version c1m does not speak (4007), or the server is at
    /// `--max-connections` (4100).
    pub(super) fn pusher_opened(&mut self, key: usize, entry: PusherEntry, now: Instant) -> Next {
        let apps = self.config.pusher_apps.len();
        // A refused client gets an app number past the list: it names no app's channels.
        let app = match entry {
            PusherEntry::App(app) => app,
            PusherEntry::UnknownKey
            | PusherEntry::UnsupportedProtocol
            | PusherEntry::OverCapacity => apps,
        };
        self.registry.conns[key].set_pusher_app(app);
        self.registry.counters.pusher_opened += 1;
        // A new socket in this slot starts with a full client event budget.
        self.client_event_budget.remove(&key);
        let refusal = match entry {
            PusherEntry::UnknownKey => {
                Some((pusher::code::UNKNOWN_APP, "App key not in this server"))
            }
            PusherEntry::UnsupportedProtocol => Some((
                pusher::code::UNSUPPORTED_PROTOCOL,
                "Unsupported protocol version: c1m speaks protocol 7",
            )),
            PusherEntry::OverCapacity => Some((pusher::code::OVER_CAPACITY, "Over capacity")),
            PusherEntry::App(_) if self.app_over_quota(app, now) => {
                self.registry.counters.pusher_over_quota += 1;
                Some((
                    pusher::code::OVER_QUOTA,
                    "Application is over connection quota",
                ))
            }
            PusherEntry::App(_) => None,
        };
        if let Some((code, message)) = refusal {
            let next = self.reply(key, &pusher::error(code, message));
            if next != Next::Keep {
                return next;
            }
            // Closed here, not through `Registry::close_open`: the read that upgraded it
            // has not counted it open yet (its caller's `Registry::after` does, and
            // then sees it closing), so it must not be uncounted either.
            let deadline = now + self.config.close_timeout;
            let registry = &mut self.registry;
            return registry.conns[key].begin_close(
                CloseCode(code),
                message,
                deadline,
                &registry.limits,
            );
        }
        let socket_id = pusher::socket_id(key);
        self.reply(key, &pusher::connection_established(&socket_id))
    }

    /// Whether app `app` holds its `max_connections` already, over the cluster: this
    /// node's count (every worker's) plus the other nodes' latest reports.
    fn app_over_quota(&mut self, app: usize, now: Instant) -> bool {
        let Some(max) = self
            .config
            .pusher_apps
            .get(app)
            .and_then(|a| a.max_connections)
        else {
            return false;
        };
        let counts = &self.registry.app_connections;
        let elsewhere = match super::upstream_events::cluster_of(&mut self.upstream) {
            Some(cluster) => {
                cluster.app_connections_elsewhere(&self.config.pusher_apps[app].id, now)
            }
            None => counts.elsewhere(app),
        };
        counts.on_node(app) + elsewhere >= max
    }

    /// A Pusher client's message.
    pub(super) fn pusher_message(&mut self, key: usize, text: &str, now: Instant) -> Next {
        let message = match ClientMessage::parse(text) {
            Ok(message) => message,
            Err(answer) => return self.reply(key, &answer),
        };
        let answer = match message {
            ClientMessage::Ping => pusher::pong(),
            ClientMessage::Pong => return Next::Keep,
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => {
                let asked = (auth.as_deref(), channel_data.as_deref());
                match self.pusher_subscribe(key, &channel, asked, now) {
                    Ok(Some(answer)) => answer,
                    // A worker's presence join: answered when the master says who is there.
                    Ok(None) => return Next::Keep,
                    Err(refusal) => {
                        self.registry.counters.pusher_subscriptions_refused += 1;
                        refusal
                    }
                }
            }
            ClientMessage::Unsubscribe { channel } => {
                let topic = self.topic_for(key, &channel);
                if let Some(id) = self.registry.topics.id(&topic) {
                    self.registry.unsubscribe(key, id);
                }
                return Next::Keep;
            }
            ClientMessage::Signin { auth, user_data } => {
                match self.pusher_signin(key, &auth, &user_data) {
                    Ok(answer) => answer,
                    Err(error) => pusher::error(pusher::code::UNAUTHORIZED, &error),
                }
            }
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => match self.pusher_client_event(key, &event, channel, &data, now) {
                Ok(()) => return Next::Keep,
                Err(refusal) => {
                    self.registry.counters.pusher_client_events_refused += 1;
                    refusal
                }
            },
            ClientMessage::Unknown(event) => pusher::error(
                pusher::code::GENERIC,
                &format!("unsupported event {event:?}"),
            ),
        };
        self.reply(key, &answer)
    }

    /// `pusher:subscribe`: a public channel is joined at once, a private one with the
    /// app's signature of this socket and channel, a presence one with the signature
    /// of its `channel_data` too. `Ok(None)`: answered later (a worker's presence
    /// join); `Err`: the subscription error to send.
    fn pusher_subscribe(
        &mut self,
        key: usize,
        channel: &str,
        (auth, channel_data): (Option<&str>, Option<&str>),
        now: Instant,
    ) -> Result<Option<String>, String> {
        let refuse =
            |status, message: &str| Err(pusher::subscription_error(channel, status, message));
        let topic = self.topic_for(key, channel);
        if channel.starts_with(pusher::USER_CHANNEL_PREFIX) {
            // The server put a signed-in socket in its user's channel already.
            if self.is_subscribed(key, &topic) {
                return Ok(Some(pusher::subscription_succeeded(channel)));
            }
            return refuse(403, "sign in as this user first (pusher:signin)");
        }
        if let Err(error) = pusher::validate_channel(channel) {
            return refuse(400, &format!("bad channel name: {error}"));
        }
        let kind = pusher::channel_kind(channel);
        let joining = match kind {
            ChannelKind::Presence => {
                let Some(channel_data) = channel_data else {
                    return refuse(400, "a presence channel needs channel_data");
                };
                match Member::parse(channel_data) {
                    Ok(member) => Some(Joining {
                        member,
                        channel_data,
                    }),
                    Err(error) => return refuse(400, &format!("bad channel_data: {error}")),
                }
            }
            _ => None,
        };
        if kind != ChannelKind::Public {
            let socket_id = pusher::socket_id(key);
            let signed_data = joining.as_ref().map(|j| j.channel_data);
            let signed = self.app_of_socket(key).is_some_and(|app| {
                auth.is_some_and(|auth| {
                    pusher::channel_auth_ok(app, &socket_id, channel, signed_data, auth)
                })
            });
            if !signed {
                let what = if joining.is_some() {
                    "\"SOCKET_ID:CHANNEL:CHANNEL_DATA\""
                } else {
                    "\"SOCKET_ID:CHANNEL\""
                };
                return refuse(
                    401,
                    &format!("invalid signature: auth must be KEY:HMAC-SHA256(secret, {what})"),
                );
            }
        }
        if let Err(full) = self.join_topic(key, &topic) {
            return refuse(400, &full);
        }
        match joining {
            Some(joining) => self.presence_join(key, &topic, joining, now),
            None => Ok(Some(pusher::subscription_succeeded(channel))),
        }
    }

    /// `pusher:signin`: a valid signature puts the socket in its user's channel
    /// (`#server-to-user-ID`: the app's `sendToUser` events, and how
    /// `terminate_connections` finds it). `Err`: why not.
    fn pusher_signin(&mut self, key: usize, auth: &str, user_data: &str) -> Result<String, String> {
        let Some(app) = self.app_of_socket(key) else {
            return Err("no app".into());
        };
        let user = pusher::signin_user(app, &pusher::socket_id(key), user_data, auth)?;
        let topic = self.topic_for(key, &format!("{}{user}", pusher::USER_CHANNEL_PREFIX));
        self.join_topic(key, &topic)?;
        self.registry.counters.pusher_signins += 1;
        Ok(pusher::signin_success(user_data))
    }

    /// The socket joins `topic` unless it is in it already; `Err` when it is in as
    /// many as `--max-topics-per-connection`.
    fn join_topic(&mut self, key: usize, topic: &str) -> Result<(), String> {
        if self.is_subscribed(key, topic) {
            return Ok(());
        }
        let limit = self.config.max_topics_per_connection;
        if self.registry.conns[key].subscription_count() >= limit {
            return Err(format!("at most {limit} channels per connection"));
        }
        self.registry.subscribe(key, topic);
        Ok(())
    }

    fn is_subscribed(&self, key: usize, topic: &str) -> bool {
        let registry = &self.registry;
        registry.conns.get(key).is_some_and(|conn| {
            registry
                .topics
                .id(topic)
                .is_some_and(|id| conn.is_subscribed(id))
        })
    }

    /// The app a Pusher socket belongs to.
    fn app_of_socket(&self, key: usize) -> Option<&pusher::App> {
        let app = self.registry.conns.get(key)?.pusher_app()?;
        self.config.pusher_apps.get(app)
    }

    /// The topic of `channel` in the app of socket `key`.
    fn topic_for(&self, key: usize, channel: &str) -> String {
        let app = self.registry.conns.get(key).and_then(|c| c.pusher_app());
        pusher::topic_of(&self.config.pusher_apps, app.unwrap_or(0), channel)
    }

    /// Closes this process's connections in a user's channel `topic` (the app asked
    /// with `terminate_connections`): `pusher:error` 4009, then close code 4009, so
    /// that pusher-js does not reconnect on its own.
    pub(super) fn terminate_user_here(&mut self, topic: &str, now: Instant) {
        let Some(id) = self.registry.topics.id(topic) else {
            return;
        };
        let keys: Vec<usize> = self
            .registry
            .topics
            .subscribers(id)
            .iter()
            .map(|&key| key as usize)
            .collect();
        let error = pusher::error(
            pusher::code::UNAUTHORIZED,
            "connection terminated by the app",
        );
        for key in keys {
            self.registry.counters.pusher_terminated += 1;
            let next = self.reply(key, &error);
            self.registry.after(key, PhaseKind::Open, next);
            let code = CloseCode(pusher::code::UNAUTHORIZED);
            self.registry
                .close_open(key, code, "terminated by the app", now);
        }
    }

    /// `POST /apps/{id}/users/{user}/terminate_connections` (`topic`: the user's
    /// channel in the app): the user's connections here, on the node's other workers,
    /// and on the cluster's other nodes.
    pub(super) fn terminate_user(&mut self, topic: &str, now: Instant) {
        match &mut self.upstream {
            Upstream::ViaMaster(link) => link.send(&Message::Terminate {
                topic: topic.to_string(),
            }),
            Upstream::ViaBroker(cluster) => {
                cluster.terminate_user(topic);
                self.terminate_user_here(topic, now);
            }
            Upstream::Local => self.terminate_user_here(topic, now),
        }
    }

    /// A `client-*` event: to the other subscribers of a private or presence channel
    /// the sender is in, when the app allows them, within the rate limit. `Err`: the
    /// `pusher:error` to send back.
    fn pusher_client_event(
        &mut self,
        key: usize,
        event: &str,
        channel: Option<String>,
        data: &Value,
        now: Instant,
    ) -> Result<(), String> {
        let refuse = |message: &str| Err(pusher::error(pusher::code::GENERIC, message));
        if !self.app_of_socket(key).is_some_and(|app| app.client_events) {
            return refuse("client events are not enabled for this app");
        }
        let Some(channel) = channel else {
            return refuse("a client event needs a channel");
        };
        let kind = pusher::channel_kind(&channel);
        if !matches!(kind, ChannelKind::Private | ChannelKind::Presence) {
            return refuse("client events go to private and presence channels only");
        }
        let topic = self.topic_for(key, &channel);
        if !self.is_subscribed(key, &topic) {
            return refuse(&format!("not subscribed to {channel}"));
        }
        let user_id = match kind {
            ChannelKind::Presence => match self.registry.presence_user(key, &topic) {
                Some(user_id) => Some(user_id.clone()),
                None => return refuse(&format!("not a member of {channel} yet")),
            },
            _ => None,
        };
        let per_second = self
            .app_of_socket(key)
            .map_or(pusher::CLIENT_EVENTS_PER_SECOND, |app| {
                app.client_events_per_second
            });
        if !self.client_event_allowed(key, per_second, now) {
            return refuse("Client event rejected due to rate limit");
        }
        let text = pusher::client_event(event, &channel, data, user_id.as_ref());
        if text.len() > MAX_CLIENT_EVENT_BYTES + 256 {
            return refuse(&format!(
                "a client event's data has at most {MAX_CLIENT_EVENT_BYTES} bytes"
            ));
        }
        self.registry.counters.pusher_client_events += 1;
        let socket = (pusher::process_token(), key as u32);
        let hook = crate::webhooks::event::client_event(
            &channel,
            event,
            data,
            &pusher::socket_id(key),
            user_id.as_ref(),
        );
        self.webhook_for(&topic, |_| hook, now);
        let frame = pusher::text_frame(&text);
        self.pusher_publish(&topic, frame, Some(socket), now)
            .map_err(|_| {
                pusher::error(pusher::code::GENERIC, "the server is busy: try again later")
            })
    }

    /// Takes one client event of `key` from its token bucket: `per_second` at most
    /// in a burst, refilled at that rate (a fixed window would let a burst across its
    /// edge through twice).
    fn client_event_allowed(&mut self, key: usize, per_second: u32, now: Instant) -> bool {
        let full = per_second as f32;
        let refill = |(at, tokens): (Instant, f32)| {
            (tokens + now.duration_since(at).as_secs_f32() * full).min(full)
        };
        let budget = &mut self.client_event_budget;
        if budget.len() > 4096 {
            // Bounded: a bucket untouched for a second refilled (whatever its rate,
            // it holds one second of events), the same as none.
            budget.retain(|_, (at, _)| now.duration_since(*at) < Duration::from_secs(1));
        }
        let bucket = budget.entry(key).or_insert((now, full));
        let tokens = refill(*bucket);
        let allowed = tokens >= 1.0;
        *bucket = (now, if allowed { tokens - 1.0 } else { tokens });
        allowed
    }

    /// Publishes a Pusher event `frame` on `topic` (leaving out `exclude`) the way a
    /// `POST /publish` goes: here, through the master, or through the broker; kept in
    /// the topic's history if it has one. Nobody waits for the count. `Err` is the
    /// HTTP answer when it cannot be taken now.
    fn pusher_publish(
        &mut self,
        topic: &str,
        frame: bytes::Bytes,
        exclude: Option<SocketRef>,
        now: Instant,
    ) -> Result<(), Vec<u8>> {
        let target = Target::Topic(topic.to_string());
        if matches!(self.upstream, Upstream::Local) {
            let position = self.keep_in_history(&target, &frame, now);
            let then = WhenDelivered::Answer(Waiting::nobody(now));
            self.publish_excluding(target, frame, position, exclude, then);
            Ok(())
        } else {
            self.publish_upstream(Waiting::nobody(now), (target, exclude), frame.to_vec(), now)
        }
    }

    /// Pusher's read API answered by this process (a single process, with or without
    /// a cluster): its exact subscriber counts plus the other nodes' latest reports.
    pub(super) fn pusher_read(
        &mut self,
        app: usize,
        read: &crate::pusher_api::Read,
        now: Instant,
    ) -> (u16, Value) {
        let mut counts = crate::node_stats::TopicCounts::default();
        for (topic, n) in self.registry.topics.subscriber_counts() {
            counts.topics.insert(topic.to_string(), n);
        }
        if let Some(cluster) = super::upstream_events::cluster_of(&mut self.upstream) {
            counts.add(&cluster.others_counts(now));
        }
        let empty = crate::presence::Presence::default();
        let presence = self.presence.as_ref().unwrap_or(&empty);
        let apps = &self.config.pusher_apps;
        crate::pusher_api::answer_for_app(apps, app, read, &counts.topics, presence)
    }

    /// `POST /apps/{id}/events` or `/batch_events`, signature checked: each event goes
    /// to each of its channels as a publication (one frame per channel, the same for
    /// native and Pusher clients), and the request is answered at once with `{}`, as
    /// Pusher does (delivery is not awaited). `Err` is the answer when it cannot be taken now.
    pub(super) fn pusher_trigger(
        &mut self,
        app: usize,
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
            self.registry.counters.pusher_api_events += 1;
            let topic = pusher::topic_of(&self.config.pusher_apps, app, channel);
            self.pusher_publish(&topic, frame, trigger.socket_id, now)?;
        }
        Ok(())
    }
}
