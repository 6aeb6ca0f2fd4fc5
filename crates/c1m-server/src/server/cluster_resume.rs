//! Resuming in a cluster (`--broker redis://…` with history), in a single-process node:
//! positions are the broker's, so a client may come back to any node.
//!
//! The node keeps a copy of what it hears of the topics it listens to
//! ([`ClusterCopy`]) and answers a resume from it like a lone server does
//! (`server/resume.rs`) when it can; else it asks the broker for the topic's history
//! after the position (`ClusterNode::recover`, which first makes sure the node
//! subscribes to the topic, so everything after the broker's answer reaches it live).
//!
//! The race: the broker's answer ends at offset R, but publications up to R may still
//! be on their way to this node live (published after it subscribed, before the read).
//! The broker link hands the answer over only after a marker it published behind the
//! read came back on the subscription (`broker::Command::Recover`), so every such
//! publication reached this process first and is in its queue or already delivered.
//! The client then gets the broker's part and the copy's after it, cut before the first
//! publication still queued here, and joins right before that one starts, exactly as a
//! local resume does. Answered `recovered: false` when the broker says the position
//! cannot be served (reasons as on one node), or when it is down or does not answer
//! within `cluster_copy::BROKER_RESUME_WAIT` (`broker_unavailable`).
//!
//! `GET /history` reads the broker too (`ClusterNode::read_history`): the node's copy
//! holds only the topics it listens to, and every node must answer alike.

use std::time::Instant;

use crate::broker::Stored;
use crate::history::{NotRecovered, Position};
use crate::http::{self, HistoryQuery};
use crate::upstream::{Upstream, Waiting};

use super::Server;

impl Server {
    /// Whether a resume of `topic` from `since` must ask the broker: a single process
    /// in a cluster whose own copy cannot answer it (see `ClusterCopy::needs_broker`).
    pub(super) fn resumes_via_broker(
        &mut self,
        topic: &str,
        since: &(u64, String),
        now: Instant,
    ) -> bool {
        if !matches!(self.upstream, Upstream::ViaBroker(_)) {
            return false;
        }
        let Some(history) = self.history.as_mut() else {
            return false;
        };
        self.copy
            .needs_broker(topic, since.0, &since.1, history, now)
    }

    /// Asks the broker for `topic` after `since`; the client joins and is answered
    /// when it comes (see the module doc).
    pub(super) fn ask_broker_to_recover(
        &mut self,
        key: usize,
        topic: &str,
        since: (u64, String),
        now: Instant,
    ) {
        let request = self.registry.next_resume;
        self.registry.next_resume = request.wrapping_add(1);
        self.registry
            .resumes
            .insert(request, (key, topic.to_string(), since.0));
        let limit = self.config.history.recovery_limit;
        let Upstream::ViaBroker(cluster) = &mut self.upstream else {
            return;
        };
        match cluster.recover(topic, since.0, limit) {
            Some(id) => self.copy.wait(id, request, topic, since.0, since.1, now),
            None => self.on_recovered(request, Err(NotRecovered::BrokerUnavailable), None),
        }
    }

    /// Whether `GET /history` reads the broker: a single process in a cluster, with
    /// history on.
    pub(super) fn history_is_the_brokers(&self) -> bool {
        self.history.is_some() && matches!(self.upstream, Upstream::ViaBroker(_))
    }

    /// `GET /history` in a cluster: answered when the broker answers.
    pub(super) fn read_broker_history(
        &mut self,
        waiting: Waiting,
        query: HistoryQuery,
        now: Instant,
    ) {
        let Upstream::ViaBroker(cluster) = &mut self.upstream else {
            return;
        };
        match cluster.read_history(&query.topic, query.since, query.limit) {
            Some(id) => self.history_reads.wait(id, waiting, query, now),
            None => {
                let (status, body) = http::history_answer_from_broker(&query, None);
                self.answer_waiting(&waiting, http::json_answer(status, &body), now);
            }
        }
    }

    /// The broker answered resume or history read `id`.
    pub(super) fn on_stored(&mut self, id: u64, stored: Option<Stored>, now: Instant) {
        if self.history_reads.waits_for(id) {
            if let Some((waiting, (status, body))) = self.history_reads.answered(id, stored) {
                self.answer_waiting(&waiting, http::json_answer(status, &body), now);
            }
            return;
        }
        let Some(history) = self.history.as_mut() else {
            return;
        };
        let limit = self.config.history.recovery_limit;
        if let Some((request, _, (outcome, position))) =
            self.copy.stored(id, stored, history, limit, now)
        {
            self.on_recovered(request, outcome, position);
        }
    }

    /// The broker confirmed this node's subscription to `topic`.
    pub(super) fn start_listening(&mut self, topic: String) {
        self.relayed.remove(&topic);
        if let Some(history) = self.history.as_mut() {
            self.copy.start(topic, history);
        }
    }

    /// After an interest change or a hold's end: a topic the node no longer listens
    /// to loses its copy.
    pub(super) fn stop_listening_unless_subscribed(&mut self, topic: &str) {
        let Upstream::ViaBroker(cluster) = &self.upstream else {
            return;
        };
        if cluster.listens_to(topic) {
            return;
        }
        self.relayed.remove(topic);
        if let Some(history) = self.history.as_mut() {
            self.copy.stop(topic, history);
        }
    }

    /// A publication from the broker at `position`: a jump means this node missed
    /// some while listening (its link was down), and its clients of the topic resume
    /// (`server/resume.rs`); it goes into the copy.
    pub(super) fn on_broker_position(
        &mut self,
        topic: &str,
        position: &Position,
        frame: &bytes::Bytes,
        now: Instant,
    ) {
        if !self.copy.listens(topic) {
            return; // in flight from a subscription that ended
        }
        if let Some(history) = self.history.as_mut() {
            self.copy.heard(topic, position, frame, history, now);
        }
        self.check_relayed_position(topic, position, now);
    }

    /// Timers: resumes the broker did not answer in time (`broker_unavailable`), and
    /// holds to end.
    pub(super) fn broker_resume_timers(&mut self, now: Instant) {
        for (waiting, (status, body)) in self.history_reads.expired(now) {
            tracing::warn!("a history read got no answer from the broker in time");
            self.answer_waiting(&waiting, http::json_answer(status, &body), now);
        }
        for (request, _) in self.copy.expired(now) {
            tracing::warn!("a resume got no answer from the broker in time");
            self.on_recovered(request, Err(NotRecovered::BrokerUnavailable), None);
        }
        for topic in self.copy.due_releases(now) {
            if let Upstream::ViaBroker(cluster) = &mut self.upstream {
                cluster.release(&topic);
            }
            self.stop_listening_unless_subscribed(&topic);
        }
    }
}
