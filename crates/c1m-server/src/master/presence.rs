//! The node's presence members, kept by the master for its workers (see `presence`
//! and `server/pusher_clients.rs`).
//!
//! A worker checks a presence subscription (signature, `channel_data`) and sends
//! `PresenceJoin`; the master adds the socket (owned by that worker), answers the
//! worker with the members, and tells the channel's other subscribers on every worker
//! with a `member_added` publication, leaving out the socket that joined. Leaves come
//! as `PresenceLeave`; a worker that dies leaves with all its sockets at once. In a
//! cluster each change is also told to the other nodes (`cluster_presence`).

use std::time::Instant;

use crate::control::{Message, Origin};
use crate::presence::{Change, Member, Refused};
use crate::pusher::{self, SocketRef};
use crate::target::Target;

use super::{Master, WorkerFds};

impl<S: Fn(WorkerFds) -> std::io::Result<std::process::Child>> Master<S> {
    /// Worker `index`'s socket joins a presence channel.
    pub(super) fn on_presence_join(
        &mut self,
        index: usize,
        channel: String,
        socket: SocketRef,
        channel_data: &str,
        now: Instant,
    ) {
        let joined = Member::parse(channel_data).and_then(|member| {
            let change = self
                .presence
                .join(&channel, socket, index as u32, member.clone())
                .map_err(|Refused::Full| "full".to_string())?;
            if let Some(cluster) = &self.cluster {
                cluster.presence_joined(&channel, socket, &member);
            }
            Ok(change)
        });
        let (outcome, change) = match joined {
            Ok(change) => (Ok(self.presence.subscription_data(&channel)), change),
            Err(reason) => (Err(reason), None),
        };
        // The joiner's answer goes first: its worker writes it before the event.
        self.workers[index].send(&Message::PresenceJoined {
            slot: socket.1,
            channel: channel.clone(),
            outcome,
        });
        if let Some(change) = change {
            self.webhook_for(
                &channel,
                |c| crate::webhooks::event::member(c, &change),
                now,
            );
            self.presence_publish(&channel, &change, Some(socket), now);
        }
    }

    /// A worker's socket left a presence channel.
    pub(super) fn on_presence_leave(&mut self, channel: &str, socket: SocketRef, now: Instant) {
        let change = self.presence.leave(channel, socket);
        if let Some(cluster) = &self.cluster {
            cluster.presence_left(channel, socket);
        }
        if let Some(change) = change {
            self.webhook_for(channel, |c| crate::webhooks::event::member(c, &change), now);
            self.presence_publish(channel, &change, None, now);
        }
    }

    /// Worker `index` died: every socket it held leaves its presence channels.
    pub(super) fn presence_worker_gone(&mut self, index: usize, now: Instant) {
        let changes = self.presence.leave_owner(index as u32);
        if let Some(cluster) = &self.cluster {
            // The other nodes diff what they held of this node against what is left.
            cluster.presence_state(&self.presence, false);
        }
        for (channel, change) in &changes {
            self.webhook_for(channel, |c| crate::webhooks::event::member(c, change), now);
        }
        self.presence_publish_all(changes, now);
    }

    /// Every worker closes its connections in a user's channel `topic`.
    pub(super) fn terminate_on_workers(&mut self, topic: &str) {
        let mut bytes = Vec::new();
        Message::Terminate {
            topic: topic.to_string(),
        }
        .encode(&mut bytes);
        self.send_to_all(&bytes);
    }

    /// Sends the event `make` writes for the channel of `topic` with the webhooks of
    /// the topic's app.
    fn webhook_for(
        &mut self,
        topic: &str,
        make: impl FnOnce(&str) -> serde_json::Value,
        now: Instant,
    ) {
        let apps = &self.config.pusher_apps;
        self.webhooks.push_for(apps, topic, make, now);
    }

    /// Worker `index` has (`on`) or no longer has subscribers of `topic`: with
    /// webhooks, the node's first subscriber or last one tells the app (unless another
    /// node of the cluster has some).
    pub(super) fn worker_interest(&mut self, index: usize, topic: &str, on: bool, now: Instant) {
        if !self.webhooks.any() || !crate::webhooks::is_app_channel(pusher::channel_of(topic)) {
            return;
        }
        let workers = self.occupied.entry(topic.to_string()).or_default();
        let was = !workers.is_empty();
        if on {
            workers.insert(index);
        } else {
            workers.remove(&index);
        }
        let is = !workers.is_empty();
        if !is {
            self.occupied.remove(topic);
        }
        let others = self
            .cluster
            .as_ref()
            .is_some_and(|c| c.others_occupy(topic));
        if was != is && !others {
            let make = if is {
                crate::webhooks::event::channel_occupied
            } else {
                crate::webhooks::event::channel_vacated
            };
            self.webhook_for(topic, make, now);
        }
    }

    /// Worker `index` died: the channels only it had subscribers of are vacated.
    pub(super) fn interest_worker_gone(&mut self, index: usize, now: Instant) {
        let topics: Vec<String> = self
            .occupied
            .iter()
            .filter(|(_, workers)| workers.contains(&index))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            self.worker_interest(index, &topic, false, now);
        }
    }

    /// Other nodes went silent: their members leave (told to the members here); the
    /// node that speaks for the cluster tells the app.
    pub(super) fn presence_expired(
        &mut self,
        expired: crate::cluster_presence::Expired,
        speaks: bool,
        now: Instant,
    ) {
        if speaks {
            let apps = &self.config.pusher_apps;
            self.webhooks.push_expired(apps, &expired, now);
        }
        self.presence_publish_all(expired.changes, now);
    }

    /// [`Self::presence_publish`] for each change (another node's, or a gone one's).
    pub(super) fn presence_publish_all(&mut self, changes: Vec<(String, Change)>, now: Instant) {
        for (channel, change) in changes {
            self.presence_publish(&channel, &change, None, now);
        }
    }

    /// Pusher's read API for a worker: the node's members, and subscribers per channel
    /// from the workers' latest counts plus the cluster's other nodes.
    pub(super) fn pusher_read(
        &self,
        app: usize,
        read: &crate::pusher_api::Read,
        now: Instant,
    ) -> (u16, serde_json::Value) {
        let mut counts = crate::node_stats::TopicCounts::default();
        for part in &self.worker_counts {
            counts.add(part);
        }
        if let Some(cluster) = &self.cluster {
            counts.add(&cluster.others_counts(now));
        }
        let apps = &self.config.pusher_apps;
        crate::pusher_api::answer_for_app(apps, app, read, &counts.topics, &self.presence)
    }

    /// Tells the subscribers of `channel` on every worker that a user came or went.
    fn presence_publish(
        &mut self,
        channel: &str,
        change: &Change,
        exclude: Option<SocketRef>,
        now: Instant,
    ) {
        let frame = pusher::member_event_frame(channel, change);
        let publish = Message::Publish {
            origin: Origin::Master,
            target: Target::Topic(channel.to_string()),
            position: None,
            exclude,
            frame: frame.to_vec(),
        };
        self.relay(publish, None, now);
    }
}
