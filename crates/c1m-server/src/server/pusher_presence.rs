//! Presence channels for Pusher clients (see `presence` for the table): a checked
//! join goes into the table here (a single process) or to the master (a worker, which
//! answers its client when the master says who is there); leaves are taken in order
//! from the registry; member events are publications on the channel, made where the
//! table is. In a cluster each change is also told to the other nodes
//! (`cluster_presence`).

use std::time::Instant;

use crate::connection::PhaseKind;
use crate::control::Message;
use crate::presence::{Change, Member, Refused};
use crate::pusher::{self, SocketRef};
use crate::target::Target;
use crate::upstream::Waiting;

use super::delivery::WhenDelivered;
use super::Server;

/// A presence subscription's checked user: who, and the `channel_data` they signed.
pub(super) struct Joining<'a> {
    pub member: Member,
    pub channel_data: &'a str,
}

impl Server {
    /// A subscribed socket joins a presence topic's members: here when this process
    /// keeps the table, else through the master.
    pub(super) fn presence_join(
        &mut self,
        key: usize,
        topic: &str,
        joining: Joining,
        now: Instant,
    ) -> Result<Option<String>, String> {
        // Earlier leaves first: one of them may be this key's previous owner's.
        self.presence_flush(now);
        self.registry.counters.pusher_presence_joins += 1;
        let socket = (pusher::process_token(), key as u32);
        self.registry
            .set_presence_user(key, topic, &joining.member.user_id);
        let Some(table) = self.presence.as_mut() else {
            self.send_to_master(&Message::PresenceJoin {
                channel: topic.to_string(),
                socket,
                channel_data: joining.channel_data.to_string(),
            });
            return Ok(None);
        };
        let member = joining.member.clone();
        match table.join(topic, socket, 0, joining.member) {
            Ok(change) => {
                if let Some(cluster) = super::upstream_events::cluster_of(&mut self.upstream) {
                    cluster.presence_joined(topic, socket, &member);
                }
                let data = table.subscription_data(topic);
                if let Some(change) = change {
                    self.presence_publish(topic, &change, Some(socket), now);
                    self.webhook_for(
                        topic,
                        |channel| crate::webhooks::event::member(channel, &change),
                        now,
                    );
                }
                Ok(Some(pusher::subscription_succeeded_with(
                    pusher::channel_of(topic),
                    &data,
                )))
            }
            Err(Refused::Full) => {
                self.presence_refused(key, topic);
                Err(presence_full(pusher::channel_of(topic)))
            }
        }
    }

    /// A presence join that was refused: the socket leaves the topic's topic.
    fn presence_refused(&mut self, key: usize, topic: &str) {
        if let Some(id) = self.registry.topics.id(topic) {
            self.registry.unsubscribe(key, id);
        }
        // Its leave is nobody's: the table never had it.
        self.registry.forget_presence_left(topic, key);
    }

    /// The master's answer to a worker's presence join: the client gets the members
    /// (or the refusal), if it is still subscribed.
    pub(super) fn on_presence_joined(
        &mut self,
        slot: u32,
        topic: &str,
        outcome: Result<String, String>,
    ) {
        let key = slot as usize;
        let registry = &self.registry;
        let subscribed = registry.conns.get(key).is_some_and(|conn| {
            conn.kind() == PhaseKind::Open
                && conn.is_pusher()
                && registry
                    .topics
                    .id(topic)
                    .is_some_and(|id| conn.is_subscribed(id))
        });
        if !subscribed {
            return;
        }
        let answer = match outcome {
            Ok(data) => pusher::subscription_succeeded_with(pusher::channel_of(topic), &data),
            Err(_) => {
                self.registry.counters.pusher_subscriptions_refused += 1;
                if let Some(id) = self.registry.topics.id(topic) {
                    self.registry.unsubscribe(key, id);
                }
                presence_full(pusher::channel_of(topic))
            }
        };
        let next = self.reply(key, &answer);
        self.registry.after(key, PhaseKind::Open, next);
    }

    /// Takes the presence topics sockets left since the last call, in order: the
    /// table here applies them (and tells the members), or the master is told.
    pub(super) fn presence_flush(&mut self, now: Instant) {
        for (topic, key) in self.registry.take_presence_left() {
            let socket = (pusher::process_token(), key as u32);
            match self.presence.as_mut() {
                Some(table) => {
                    let change = table.leave(&topic, socket);
                    if let Some(cluster) = super::upstream_events::cluster_of(&mut self.upstream) {
                        cluster.presence_left(&topic, socket);
                    }
                    if let Some(change) = change {
                        self.presence_publish(&topic, &change, None, now);
                        self.webhook_for(
                            &topic,
                            |channel| crate::webhooks::event::member(channel, &change),
                            now,
                        );
                    }
                }
                None => self.send_to_master(&Message::PresenceLeave {
                    channel: topic,
                    socket,
                }),
            }
        }
    }

    /// Tells the members of `topic` here that a user came or went (not `exclude`,
    /// the socket that joined: it gets the member list instead).
    pub(super) fn presence_publish(
        &mut self,
        topic: &str,
        change: &Change,
        exclude: Option<SocketRef>,
        now: Instant,
    ) {
        let frame = pusher::member_event_frame(topic, change);
        let target = Target::Topic(topic.to_string());
        let then = WhenDelivered::Answer(Waiting::nobody(now));
        self.publish_excluding(target, frame, None, exclude, then);
    }

    /// [`Server::presence_publish`] for each change of another node's (or a gone
    /// node's) members.
    pub(super) fn presence_publish_all(&mut self, changes: Vec<(String, Change)>, now: Instant) {
        for (topic, change) in changes {
            self.presence_publish(&topic, &change, None, now);
        }
    }
}

/// The refusal of a join to a presence channel that holds its most members.
fn presence_full(channel: &str) -> String {
    let limit = crate::presence::MAX_MEMBERS;
    pusher::subscription_error(
        channel,
        403,
        &format!("the presence channel is full (at most {limit} members)"),
    )
}
