//! A node's membership in a cluster (`--broker`): the one type behind both the
//! single-process node and the master of a multi-process one.
//!
//! It owns the node's [`BrokerLink`] and everything that follows from it: which topics
//! the node subscribes to on the broker (the union of its members' interest; a member
//! is a worker of the master, or the single process itself as member 0), the
//! publishes waiting for their delivery counts ([`PublishAcks`]), the other nodes'
//! latest reports ([`ClusterView`]) and this node's own report once a second.
//!
//! The owner drives it from its event loop: [`ClusterNode::events`] when the link's
//! waker fires, [`ClusterNode::expire`] and [`ClusterNode::report_due`] on timers. It
//! never touches connections: publications to deliver come back as
//! [`ClusterEvent::Deliver`], and the owner answers them with [`ClusterNode::ack`].
//! `W` identifies who waits for a publish's answer (an HTTP connection in a single
//! process, a worker's request in the master).

use std::collections::{HashMap, HashSet};
use std::io;
use std::sync::Arc;
use std::time::Instant;

use mio::{Registry, Token};
use serde_json::Value;

use crate::broker::{self, BrokerLink, Keep, Reply, Stored};
use crate::cluster_presence::ClusterPresence;
use crate::config::BrokerUrl;
use crate::history::Position;
use crate::node_stats::{self, ClusterView, NodeReport};
use crate::presence::{Member, Presence};
use crate::publish_acks::{Finished, PublishAcks};
use crate::pusher::SocketRef;
use crate::target::Target;

/// What the link brought that the owner must act on.
#[derive(Debug)]
pub enum ClusterEvent<W> {
    /// A publication from any node (this one included): deliver it to the local
    /// connections of `target`, then call [`ClusterNode::ack`] with the count.
    Deliver {
        target: Target,
        frame: Vec<u8>,
        reply: Reply,
        /// Its place in the topic's history, when the broker keeps one.
        position: Option<Position>,
        /// A Pusher socket to leave out (a trigger's `socket_id`).
        exclude: Option<crate::pusher::SocketRef>,
    },
    /// The broker's answer to [`ClusterNode::recover`] `id` (`None`: it could not say).
    Stored { id: u64, stored: Option<Stored> },
    /// The node listens to `topic` afresh: what it heard before is no baseline.
    Subscribed(String),
    /// A publish of this node's is over: answer whoever waits for it.
    Finished(Finished<W>),
    /// The link went up or down (already logged). Up: the owner announces its
    /// presence state ([`ClusterNode::presence_state`] with `ask`).
    Up(bool),
    /// Another node's presence change: apply it with [`ClusterNode::apply_presence`].
    Presence(Vec<u8>),
}

pub struct ClusterNode<W> {
    link: BrokerLink,
    /// This node's name in reports and acks (see `node_stats::node_id`).
    node: String,
    up: bool,
    next_id: u64,
    acks: PublishAcks<W>,
    view: ClusterView,
    /// Topics with local subscribers, and which members have them: the broker
    /// subscription follows the first member in and the last one out.
    interest: HashMap<String, HashSet<usize>>,
    /// Topics held subscribed for resumes in progress (see [`ClusterNode::recover`]),
    /// with how many.
    held: HashMap<String, usize>,
    next_report: Instant,
    /// Presence across the cluster: the other nodes' owner ids in the owner's table
    /// (boxed: used rarely, and it would make every `Upstream` larger).
    presence: Box<ClusterPresence>,
    /// Tell the other nodes which channels have subscribers here (with webhooks).
    share_occupancy: bool,
}

impl<W> ClusterNode<W> {
    /// Starts the link; its events wake `registry` with `token`. `history`: the
    /// node's history policy, if it keeps any.
    pub fn start(
        url: BrokerUrl,
        node: String,
        history: Option<crate::history::Policy>,
        registry: &Registry,
        token: Token,
    ) -> io::Result<ClusterNode<W>> {
        let waker = Arc::new(mio::Waker::new(registry, token)?);
        let link = BrokerLink::start(url, &node, history, move || {
            let _ = waker.wake();
        })?;
        Ok(ClusterNode {
            link,
            presence: Box::new(ClusterPresence::new(&node)),
            share_occupancy: false,
            node,
            up: false,
            next_id: 0,
            acks: PublishAcks::default(),
            view: ClusterView::default(),
            interest: HashMap::new(),
            held: HashMap::new(),
            next_report: Instant::now(),
        })
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// Member `member` has (`on`) or no longer has subscribers of `topic`.
    pub fn interest(&mut self, member: usize, topic: &str, on: bool) {
        let held = self.held.contains_key(topic);
        if on {
            let members = self.interest.entry(topic.to_string()).or_default();
            if members.is_empty() {
                if !held {
                    self.link
                        .send(broker::Command::Subscribe(topic.to_string()));
                }
                self.tell_occupancy(topic, true);
            }
            self.interest
                .entry(topic.to_string())
                .or_default()
                .insert(member);
        } else if let Some(members) = self.interest.get_mut(topic) {
            members.remove(&member);
            if members.is_empty() {
                self.interest.remove(topic);
                if !held {
                    self.link
                        .send(broker::Command::Unsubscribe(topic.to_string()));
                }
                self.tell_occupancy(topic, false);
            }
        }
    }

    /// From now on, tell the other nodes which channels have subscribers here (Pusher
    /// webhooks: `channel_occupied`/`vacated` once per cluster).
    pub fn share_occupancy(&mut self) {
        self.share_occupancy = true;
    }

    fn tell_occupancy(&self, topic: &str, on: bool) {
        if self.share_occupancy {
            let change = self.presence.occupancy(topic, on);
            self.link.send(broker::Command::Presence(change));
        }
    }

    /// Whether another node has subscribers of `topic` (with [`Self::share_occupancy`]).
    pub fn others_occupy(&self, topic: &str) -> bool {
        self.presence.others_occupy(topic)
    }

    /// Whether this node has subscribers of `topic`.
    pub fn occupies(&self, topic: &str) -> bool {
        self.interest.contains_key(topic)
    }

    /// Whether this node's name is the least of the nodes heard from lately: the one
    /// that speaks for the cluster when a node goes silent (webhooks sent once).
    pub fn speaks_for_the_cluster(&self, now: Instant) -> bool {
        self.view
            .fresh_nodes(now)
            .all(|node| node >= self.node.as_str())
    }

    /// Asks the broker what it keeps of `topic` after offset `since` (at most
    /// `limit`), for a client resuming from there; answered by
    /// [`ClusterEvent::Stored`] with the returned id. The topic is held subscribed
    /// first (the broker confirms a subscription before it reads the history), so every
    /// publication after what the answer holds reaches this node live; the owner calls
    /// [`ClusterNode::release`] once the client joined. `None` while the link is down.
    pub fn recover(&mut self, topic: &str, since: u64, limit: usize) -> Option<u64> {
        if !self.up {
            return None;
        }
        let count = self.held.entry(topic.to_string()).or_default();
        *count += 1;
        if *count == 1 && !self.interest.contains_key(topic) {
            self.link
                .send(broker::Command::Subscribe(topic.to_string()));
        }
        Some(self.read(topic, since, limit, true))
    }

    /// Reads what the broker keeps of `topic` after offset `since` (at most `limit`),
    /// for `GET /history`: a snapshot, with no subscription and no wait for live
    /// publications; answered by [`ClusterEvent::Stored`] with the returned id. `None`
    /// while the link is down.
    pub fn read_history(&mut self, topic: &str, since: u64, limit: usize) -> Option<u64> {
        if !self.up {
            return None;
        }
        Some(self.read(topic, since, limit, false))
    }

    /// Sends `Command::Recover`; its id.
    fn read(&mut self, topic: &str, since: u64, limit: usize, sync: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.link.send(broker::Command::Recover {
            id,
            topic: topic.to_string(),
            since,
            limit,
            sync,
        });
        id
    }

    /// Whether the node is (or is about to be) subscribed to `topic` on the broker.
    pub fn listens_to(&self, topic: &str) -> bool {
        self.interest.contains_key(topic) || self.held.contains_key(topic)
    }

    /// Ends a hold of [`ClusterNode::recover`]: call it after the resumed client joined
    /// (its member's interest then keeps the subscription).
    pub fn release(&mut self, topic: &str) {
        let Some(count) = self.held.get_mut(topic) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            self.held.remove(topic);
            if !self.interest.contains_key(topic) {
                self.link
                    .send(broker::Command::Unsubscribe(topic.to_string()));
            }
        }
    }

    /// A member is gone (a dead worker): it has no subscribers any more.
    pub fn forget_member(&mut self, member: usize) {
        let topics: Vec<String> = self
            .interest
            .iter()
            .filter(|(_, members)| members.contains(&member))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            self.interest(member, &topic, false);
        }
    }

    /// Hands a publish to the broker; `who` is answered through
    /// [`ClusterEvent::Finished`] or [`ClusterNode::expire`]. While the link is down it
    /// is refused at once: `Err(who)`.
    /// With `keep`, the broker keeps it in the topic's history and gives its position;
    /// `exclude` travels with it to every node (a Pusher socket to leave out).
    pub fn publish(
        &mut self,
        who: W,
        (target, exclude): (Target, Option<crate::pusher::SocketRef>),
        frame: Vec<u8>,
        keep: Option<Keep>,
        now: Instant,
    ) -> Result<(), W> {
        if !self.up {
            return Err(who);
        }
        let id = self.next_id;
        self.next_id += 1;
        let local_has = match &target {
            Target::All => true,
            Target::Topic(name) => self.interest.contains_key(name),
        };
        let expected = self.view.nodes_with(&target, &self.node, local_has, now);
        let topic = target.to_wire().to_string();
        self.acks.start(id, who, target, expected, now);
        self.link.send(broker::Command::Publish {
            id,
            topic,
            frame,
            keep,
            exclude,
        });
        Ok(())
    }

    /// Takes what the link reported. Node reports are recorded here; the rest is for
    /// the owner.
    pub fn events(&mut self, now: Instant) -> Vec<ClusterEvent<W>> {
        let mut out = Vec::new();
        while let Some(event) = self.link.next_event() {
            match event {
                broker::Event::Message {
                    topic,
                    frame,
                    reply,
                    position,
                    exclude,
                } => out.push(ClusterEvent::Deliver {
                    target: Target::from_wire(topic),
                    frame,
                    reply,
                    position,
                    exclude,
                }),
                broker::Event::Published { id, ok, position } => out.extend(
                    self.acks
                        .confirmed(id, ok, position)
                        .map(ClusterEvent::Finished),
                ),
                broker::Event::Stored { id, stored } => {
                    out.push(ClusterEvent::Stored { id, stored })
                }
                broker::Event::Subscribed(topic) => out.push(ClusterEvent::Subscribed(topic)),
                broker::Event::Ack {
                    id,
                    node,
                    delivered,
                } => out.extend(
                    self.acks
                        .ack(id, node, delivered)
                        .map(ClusterEvent::Finished),
                ),
                broker::Event::Presence(change) => out.push(ClusterEvent::Presence(change)),
                broker::Event::Report(report) => {
                    if let Err(error) = self.view.record(&report, now) {
                        tracing::warn!(%error, "ignoring a node report from the broker");
                    }
                }
                broker::Event::Up(up) => {
                    if self.up != up {
                        if up {
                            tracing::info!("broker link up");
                        } else {
                            tracing::warn!(
                                "broker link down: publishes are refused until it is back"
                            );
                        }
                    }
                    self.up = up;
                    out.push(ClusterEvent::Up(up));
                }
            }
        }
        out
    }

    /// This node's socket joined a presence channel: the other nodes are told.
    pub fn presence_joined(&self, channel: &str, socket: SocketRef, member: &Member) {
        let change = self.presence.join(channel, socket, member);
        self.link.send(broker::Command::Presence(change));
    }

    /// This node's socket left a presence channel: the other nodes are told.
    pub fn presence_left(&self, channel: &str, socket: SocketRef) {
        let change = self.presence.leave(channel, socket);
        self.link.send(broker::Command::Presence(change));
    }

    /// Announces every socket of this node's in `table` (after the link came up, with
    /// `ask` so the others answer with theirs; after a worker died, without).
    pub fn presence_state(&self, table: &Presence, ask: bool) {
        let occupied: Vec<String> = if self.share_occupancy {
            self.interest.keys().cloned().collect()
        } else {
            Vec::new()
        };
        for part in self.presence.state(table, &occupied, ask) {
            self.link.send(broker::Command::Presence(part));
        }
    }

    /// Applies another node's presence change to `table`: the member events for this
    /// node's subscribers, and a user whose connections to close. A node asking for
    /// states is answered here.
    pub fn apply_presence(
        &mut self,
        table: &mut Presence,
        change: &[u8],
        now: Instant,
    ) -> crate::cluster_presence::Applied {
        match self.presence.apply(table, change, now) {
            Ok(applied) => {
                if applied.state_wanted {
                    self.presence_state(table, false);
                }
                applied
            }
            Err(error) => {
                tracing::warn!(%error, "ignoring a presence message from the broker");
                Default::default()
            }
        }
    }

    /// The app asked this node to close the connections in a user's channel `topic`:
    /// the other nodes are told.
    pub fn terminate_user(&self, topic: &str) {
        self.link
            .send(broker::Command::Presence(self.presence.terminate(topic)));
    }

    /// Other nodes gone silent (see `cluster_presence`): their sockets leave `table`;
    /// the channels they alone had subscribers of are vacated (not counting this node).
    pub fn expire_presence(
        &mut self,
        table: &mut Presence,
        now: Instant,
    ) -> crate::cluster_presence::Expired {
        let view = &self.view;
        let mut expired = self
            .presence
            .expire(table, |node| view.reported_at(node), now);
        expired
            .vacated
            .retain(|topic| !self.interest.contains_key(topic));
        expired
    }

    /// Subscribers per topic on the cluster's other nodes (their latest reports).
    pub fn others_counts(&self, now: Instant) -> crate::node_stats::TopicCounts {
        self.view.others_counts(&self.node, now)
    }

    /// Open Pusher connections of app `app_id` on the other nodes, as of their latest
    /// reports.
    pub fn app_connections_elsewhere(&self, app_id: &str, now: Instant) -> u64 {
        self.view.others_app_connections(&self.node, app_id, now)
    }

    /// Tells a publishing node how many local connections its publication reached.
    pub fn ack(&self, reply: Reply, delivered: u64) {
        self.link.send(broker::Command::Ack { reply, delivered });
    }

    /// Publishes past `publish_acks::ACK_WAIT`, answered with what was counted.
    pub fn expire(&mut self, now: Instant) -> Vec<Finished<W>> {
        self.acks.expire(now)
    }

    /// The earliest time [`ClusterNode::expire`] or [`ClusterNode::report_due`] has work.
    pub fn next_deadline(&self) -> Instant {
        match self.acks.next_deadline() {
            Some(at) => at.min(self.next_report),
            None => self.next_report,
        }
    }

    /// Whether this node's report is due (every `node_stats::REPORT_EVERY`); if so,
    /// the owner sends it with [`ClusterNode::send_report`].
    pub fn report_due(&mut self, now: Instant) -> bool {
        if now < self.next_report {
            return false;
        }
        self.next_report = now + node_stats::REPORT_EVERY;
        self.up
    }

    pub fn send_report(&self, report: &NodeReport) {
        let json = serde_json::to_vec(report).unwrap_or_default();
        self.link.send(broker::Command::Report(json));
    }

    /// The status and body of `GET /stats` (`cluster`: `?scope=cluster`).
    pub fn stats(&mut self, local: &NodeReport, cluster: bool, now: Instant) -> (u16, Value) {
        node_stats::answer(local, cluster, Some((&mut self.view, self.up)), now)
    }
}
