//! Publications and answers from upstream (the master, or the cluster's broker), and
//! the requests that wait for them.
//!
//! Every waiting request is answered within a bound: a worker's within
//! `upstream::MASTER_ANSWER_WAIT` (504 if the master is stuck), a publish through the
//! broker within `publish_acks::ACK_WAIT` (with what was counted, `"complete": false`).

use std::time::Instant;

use bytes::Bytes;
use serde_json::Value;

use crate::cluster::{ClusterEvent, ClusterNode};
use crate::control::{Message, Origin};
use crate::http;
use crate::publish_acks::Finished;
use crate::target::{Delivery, Target};
use crate::upstream::{Upstream, Waiting, WaitingFor, MASTER_ANSWER_WAIT};

use super::delivery::WhenDelivered;
use super::Server;

impl Server {
    /// Hands a publish to the master or the broker; answered later. `Err` holds the
    /// answer to send now (the broker is down). `exclude`: a Pusher socket to leave out,
    /// wherever it is.
    pub(super) fn publish_upstream(
        &mut self,
        waiting: Waiting,
        (target, exclude): (Target, Option<crate::pusher::SocketRef>),
        frame: Vec<u8>,
        now: Instant,
    ) -> Result<(), Vec<u8>> {
        match &mut self.upstream {
            Upstream::Local => unreachable!("a local publish is delivered at once"),
            Upstream::ViaMaster(link) => {
                let request = link.park(waiting, now);
                link.send(&Message::Relay {
                    request,
                    target,
                    exclude,
                    frame,
                });
                self.flush_to_master(now);
                Ok(())
            }
            Upstream::ViaBroker(cluster) => {
                // A topic with history: the broker keeps it and gives its position.
                let keep = match (&self.history, &target) {
                    (Some(history), Target::Topic(name)) => {
                        crate::broker::Keep::for_topic(history.policy(), name)
                    }
                    _ => None,
                };
                cluster
                    .publish(waiting, (target, exclude), frame, keep, now)
                    .map_err(|_| http::broker_refusal())
            }
        }
    }

    /// A worker's `GET /stats`: the master answers for the node.
    pub(super) fn ask_master_for_stats(&mut self, waiting: Waiting, cluster: bool, now: Instant) {
        if let Upstream::ViaMaster(link) = &mut self.upstream {
            let request = link.park(waiting, now);
            link.send(&Message::StatsRequest { request, cluster });
        }
    }

    /// Pusher's read API in a worker: the master keeps the node's presence members and
    /// its workers' subscriber counts.
    pub(super) fn ask_master_for_pusher_read(
        &mut self,
        waiting: Waiting,
        app: usize,
        read: &crate::pusher_api::Read,
        now: Instant,
    ) {
        if let Upstream::ViaMaster(link) = &mut self.upstream {
            let request = link.park(waiting, now);
            let json = serde_json::to_vec(&(app, read)).unwrap_or_default();
            link.send(&Message::PusherRead { request, json });
        }
    }

    /// `GET /history` in a worker: the master keeps the node's history.
    pub(super) fn ask_master_for_history(
        &mut self,
        waiting: Waiting,
        query: &http::HistoryQuery,
        now: Instant,
    ) {
        if let Upstream::ViaMaster(link) = &mut self.upstream {
            let request = link.park(waiting, now);
            let mut text = format!(
                "topic={}&since={}&limit={}",
                query.topic, query.since, query.limit
            );
            if let Some(epoch) = &query.epoch {
                text.push_str(&format!("&epoch={epoch}"));
            }
            link.send(&Message::HistoryRequest {
                request,
                query: text,
            });
        }
    }

    /// Writes what is queued for the master. Losing the master ends this worker.
    pub(super) fn flush_to_master(&mut self, now: Instant) {
        let Upstream::ViaMaster(link) = &mut self.upstream else {
            return;
        };
        if link.has_output() {
            if let Err(error) = link.flush() {
                self.master_lost(error, now);
            }
        }
    }

    fn master_lost(&mut self, error: std::io::Error, now: Instant) {
        if self.shutdown_deadline.is_none() {
            tracing::warn!(%error, "control channel to the master lost: shutting down");
            self.begin_shutdown(now);
        }
    }

    /// The control channel is ready: read and act on what the master sent.
    pub(super) fn on_master_messages(&mut self, now: Instant) {
        if !self.publications.has_room() {
            // Back-pressure: the master's queue to this worker fills instead.
            self.upstream_paused = true;
            return;
        }
        let Upstream::ViaMaster(link) = &mut self.upstream else {
            return;
        };
        let messages = match link.io() {
            Ok(messages) => messages,
            Err(error) => return self.master_lost(error, now),
        };
        // Clock ticks that queued up while this worker was busy (a fan-out longer than
        // the interval, a stop) coalesce in `publish`: only the newest is sent.
        for message in messages {
            self.on_master_message(message, now);
        }
        self.flush_to_master(now);
    }

    fn on_master_message(&mut self, message: Message, now: Instant) {
        let Upstream::ViaMaster(link) = &mut self.upstream else {
            return;
        };
        match message {
            Message::Publish {
                origin,
                target,
                position,
                exclude,
                frame,
            } => {
                let then = match origin {
                    Origin::Clock => WhenDelivered::Clock,
                    Origin::Master => WhenDelivered::Answer(Waiting::nobody(now)),
                    origin => WhenDelivered::TellMaster(origin),
                };
                if let (Target::Topic(topic), Some(position)) = (&target, &position) {
                    self.check_relayed_position(topic, position, now);
                }
                self.publish_excluding(target, Bytes::from(frame), position, exclude, then);
            }
            Message::Done {
                request,
                delivery,
                position,
            } => {
                if let Some(mut waiting) = link.unpark(request) {
                    if let WaitingFor::Publish(_, at) = &mut waiting.request {
                        *at = position;
                    }
                    self.answer_publish(waiting, delivery, now);
                }
            }
            Message::Recovered {
                request,
                outcome,
                position,
            } => self.on_recovered(request, outcome, position),
            Message::Answer {
                request,
                status,
                json,
            } => {
                if let Some(waiting) = link.unpark(request) {
                    let body: Value = serde_json::from_slice(&json).unwrap_or_default();
                    self.answer_waiting(&waiting, http::json_answer(status, &body), now);
                }
            }
            Message::BrokerUp { up } => link.cluster_up = Some(up),
            Message::Listening { topic } => {
                self.relayed.remove(&topic);
            }
            Message::HistoryLargest { json } => match serde_json::from_slice(&json) {
                Ok(largest) => link.history_largest = largest,
                Err(error) => tracing::warn!(%error, "bad history sizes from the master"),
            },
            Message::PresenceJoined {
                slot,
                channel,
                outcome,
            } => self.on_presence_joined(slot, &channel, outcome),
            Message::Terminate { topic } => self.terminate_user_here(&topic, now),
            Message::WebhookCounts { json } => match serde_json::from_slice(&json) {
                Ok(counts) => link.webhook_counts = Some(counts),
                Err(error) => tracing::warn!(%error, "bad webhook counts from the master"),
            },
            Message::Relay { .. }
            | Message::PresenceJoin { .. }
            | Message::PusherRead { .. }
            | Message::Webhook { .. }
            | Message::PresenceLeave { .. }
            | Message::Delivered { .. }
            | Message::Interest { .. }
            | Message::TopicCounts { .. }
            | Message::StatsRequest { .. }
            | Message::HistoryRequest { .. }
            | Message::Recover { .. } => {
                tracing::warn!("unexpected control message from the master");
            }
        }
    }

    /// The broker link's waker fired (single process in a cluster).
    pub(super) fn on_cluster_events(&mut self, now: Instant) {
        if !self.publications.has_room() {
            // Back-pressure: the broker link's queue fills instead.
            self.upstream_paused = true;
            return;
        }
        let Upstream::ViaBroker(cluster) = &mut self.upstream else {
            return;
        };
        for event in cluster.events(now) {
            match event {
                ClusterEvent::Deliver {
                    target,
                    frame,
                    reply,
                    position,
                    exclude,
                } => {
                    let then = WhenDelivered::AckBroker(reply);
                    let frame = Bytes::from(frame);
                    if let (Target::Topic(topic), Some(at)) = (&target, &position) {
                        self.on_broker_position(topic, at, &frame, now);
                    }
                    self.publish_excluding(target, frame, position, exclude, then);
                }
                ClusterEvent::Stored { id, stored } => self.on_stored(id, stored, now),
                ClusterEvent::Subscribed(topic) => self.start_listening(topic),
                ClusterEvent::Finished(finished) => self.finish_cluster_publish(finished, now),
                ClusterEvent::Up(up) => {
                    if let (false, Some(history)) = (up, self.history.as_mut()) {
                        self.copy.stop_all(history);
                    }
                    if let (true, Some(table)) = (up, &self.presence) {
                        cluster_of(&mut self.upstream)
                            .inspect(|cluster| cluster.presence_state(table, true));
                    }
                }
                ClusterEvent::Presence(change) => {
                    let applied = match (cluster_of(&mut self.upstream), self.presence.as_mut()) {
                        (Some(cluster), Some(table)) => cluster.apply_presence(table, &change, now),
                        _ => Default::default(),
                    };
                    if let Some(topic) = applied.terminate {
                        self.terminate_user_here(&topic, now);
                    }
                    self.presence_publish_all(applied.changes, now);
                }
            }
        }
    }

    fn finish_cluster_publish(&mut self, finished: Finished<Waiting>, now: Instant) {
        match finished {
            Finished::Refused(waiting) => self.answer_publish(waiting, Delivery::Refused, now),
            Finished::Delivered(waiting, body) => {
                self.answer_waiting(&waiting, http::json_answer(200, &body), now);
            }
        }
    }

    /// Timed upstream work: expired waiting requests, the node's report.
    pub(super) fn upstream_timers(&mut self, now: Instant) {
        match &mut self.upstream {
            Upstream::Local => {}
            Upstream::ViaMaster(link) => {
                let late = link.expire(now);
                let counts_due = link.report_due(now);
                for waiting in late {
                    tracing::warn!("the master did not answer a request in time");
                    let response = http::no_answer_in_time(MASTER_ANSWER_WAIT);
                    self.answer_waiting(&waiting, response, now);
                }
                if counts_due {
                    let json = serde_json::to_vec(&self.topic_counts()).unwrap_or_default();
                    self.send_to_master(&Message::TopicCounts { json });
                }
            }
            Upstream::ViaBroker(cluster) => {
                let late = cluster.expire(now);
                let report_due = cluster.report_due(now);
                for finished in late {
                    self.finish_cluster_publish(finished, now);
                }
                self.broker_resume_timers(now);
                if report_due {
                    let report = self.node_report();
                    if let Upstream::ViaBroker(cluster) = &mut self.upstream {
                        cluster.send_report(&report);
                        let speaks = cluster.speaks_for_the_cluster(now);
                        let gone = match self.presence.as_mut() {
                            Some(table) => cluster.expire_presence(table, now),
                            None => Default::default(),
                        };
                        self.presence_expired(gone, speaks, now);
                    }
                }
            }
        }
    }

    /// Queues a message for the master (written at the end of the turn).
    pub(super) fn send_to_master(&mut self, message: &Message) {
        if let Upstream::ViaMaster(link) = &mut self.upstream {
            link.send(message);
        }
    }
}

/// The cluster link of a single process in a cluster.
pub(super) fn cluster_of(upstream: &mut Upstream) -> Option<&mut ClusterNode<Waiting>> {
    match upstream {
        Upstream::ViaBroker(cluster) => Some(cluster),
        _ => None,
    }
}
