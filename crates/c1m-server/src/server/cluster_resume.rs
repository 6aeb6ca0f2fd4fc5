//! Resuming in a cluster (`--broker redis://…` with history, a single-process node):
//! positions are the broker's, so a client may come back to any node.
//!
//! Every node keeps what it delivered in its own store (`History::record`, with the
//! positions the broker gave), and a resume it can answer from there is answered like
//! on a lone server (`server/resume.rs`). When the store cannot say (the position is
//! older than what this node has seen: it started since, or the client comes from
//! another node after a quiet spell), the node asks the broker for the topic's history
//! after the position (`ClusterNode::recover`, which first makes sure the node
//! subscribes to the topic, so everything after the broker's answer reaches it live).
//!
//! The race: the broker's answer ends at offset R, but publications up to R may still
//! be on their way to this node live (published after it subscribed, before the read).
//! The broker link hands the answer over only after a marker it published behind the
//! read came back on the subscription (`broker::Command::Recover`), so every such
//! publication reached this process first and is in its queue or already delivered.
//! The client then gets the broker's part (since + 1 ..= R) and this node's store
//! after R, cut before the first publication still queued here, and joins right
//! before that one starts, exactly as a local resume does. Answered
//! `recovered: false` when the broker says the position cannot be served (reasons as
//! on one node), or when it is down or does not answer within [`BROKER_RESUME_WAIT`]
//! (`broker_unavailable`).

use std::time::{Duration, Instant};

use crate::broker::Stored;
use crate::history::{NotRecovered, Position, Recovery};
use crate::upstream::Upstream;

use super::Server;

/// Longest a resume waits for the broker's answer and the live stream to reach it.
pub const BROKER_RESUME_WAIT: Duration = Duration::from_secs(3);

/// A resume waiting for the broker (by the broker request's id, in `Server`).
#[derive(Debug)]
pub(super) struct BrokerResume {
    /// The resume's entry in `Registry::resumes` (dropped if the client goes away).
    request: u32,
    topic: String,
    since: u64,
    epoch: String,
    deadline: Instant,
}

impl Server {
    /// Whether a resume of `topic` from `since` must ask the broker: a single process
    /// in a cluster whose own copy cannot answer it (it does not listen to the topic,
    /// lacks its epoch or the publications after the position, or has not heard of the
    /// position yet).
    pub(super) fn resumes_via_broker(
        &mut self,
        topic: &str,
        since: &(u64, String),
        now: Instant,
    ) -> bool {
        if !matches!(self.upstream, Upstream::ViaBroker(_)) {
            return false;
        }
        if self.history.is_none() {
            return false;
        }
        if !self.listening.contains(topic) {
            return true; // this node's copy is not whole
        }
        let Some(history) = self.history.as_mut() else {
            return false;
        };
        matches!(
            history.recover(topic, &since.1, since.0, now),
            Recovery::NotRecovered {
                // Ahead here may only mean that this node lags the one the client
                // came from: the broker knows.
                reason: NotRecovered::EpochChanged
                    | NotRecovered::TooOld
                    | NotRecovered::AheadOfTopic,
                ..
            }
        )
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
            Some(id) => {
                let resume = BrokerResume {
                    request,
                    topic: topic.to_string(),
                    since: since.0,
                    epoch: since.1,
                    deadline: now + BROKER_RESUME_WAIT,
                };
                self.broker_resumes.insert(id, resume);
            }
            None => self.on_recovered(request, Err(NotRecovered::BrokerUnavailable), None),
        }
    }

    /// The broker answered resume `id`.
    pub(super) fn on_stored(&mut self, id: u64, stored: Option<Stored>, now: Instant) {
        let Some(resume) = self.broker_resumes.remove(&id) else {
            return;
        };
        let Some(stored) = stored else {
            return self.finish_broker_resume(resume, Err(NotRecovered::BrokerUnavailable), None);
        };
        let position = stored.epoch.clone().map(|epoch| Position {
            offset: stored.offset,
            epoch,
        });
        let limit = self.config.history.recovery_limit as u64;
        let since = resume.since;
        let reason = match &position {
            None => Some(NotRecovered::EpochChanged),
            Some(p) if p.epoch != resume.epoch => Some(NotRecovered::EpochChanged),
            Some(p) if since > p.offset => Some(NotRecovered::AheadOfTopic),
            Some(p) if p.offset - since > limit => Some(NotRecovered::OverLimit),
            Some(p)
                if p.offset > since
                    && stored.publications.first().map(|e| e.0) != Some(since + 1) =>
            {
                Some(NotRecovered::TooOld)
            }
            Some(_) => None,
        };
        if let Some(reason) = reason {
            return self.finish_broker_resume(resume, Err(reason), position);
        }
        let outcome = self.broker_and_local(&resume, stored.publications, now);
        // Where the topic stands: the latest this node has seen, else the broker's.
        let position = self
            .relayed
            .get(&resume.topic)
            .filter(|p| p.epoch == resume.epoch && p.offset > stored.offset)
            .cloned()
            .or(position);
        self.finish_broker_resume(resume, outcome, position);
    }

    /// The missed publications: the broker's part, then what this node's store has
    /// after it (publications that came live meanwhile), contiguous (a hole in this
    /// node's store is `TooOld`).
    fn broker_and_local(
        &mut self,
        resume: &BrokerResume,
        mut publications: Vec<(u64, Vec<u8>)>,
        now: Instant,
    ) -> Result<Vec<(u64, Vec<u8>)>, NotRecovered> {
        let mut last = publications.last().map_or(resume.since, |p| p.0);
        let live = self
            .relayed
            .get(&resume.topic)
            .filter(|p| p.epoch == resume.epoch)
            .map_or(last, |p| p.offset);
        if live > last {
            let history = self.history.as_mut().ok_or(NotRecovered::NoHistory)?;
            let (page, _) = history
                .page(&resume.topic, Some(&resume.epoch), last, usize::MAX, now)
                .map_err(|_| NotRecovered::TooOld)?;
            for (offset, frame) in page {
                if offset != last + 1 {
                    return Err(NotRecovered::TooOld);
                }
                publications.push((offset, frame.to_vec()));
                last = offset;
            }
            if last < live {
                return Err(NotRecovered::TooOld);
            }
        }
        Ok(publications)
    }

    /// Joins and answers the client (if it is still there) and ends the topic's hold.
    fn finish_broker_resume(
        &mut self,
        resume: BrokerResume,
        outcome: Result<Vec<(u64, Vec<u8>)>, NotRecovered>,
        position: Option<Position>,
    ) {
        self.on_recovered(resume.request, outcome, position);
        // Released after this turn's interest changes went upstream (the client's
        // join among them), so the subscription never lapses in between.
        self.releases.push(resume.topic);
    }

    /// The broker confirmed this node's subscription to `topic`: what it hears from
    /// now on is whole; its copy starts afresh, and offsets are compared from here.
    pub(super) fn start_listening(&mut self, topic: String) {
        self.relayed.remove(&topic);
        if let Some(history) = self.history.as_mut() {
            history.forget(&topic);
        }
        self.listening.insert(topic);
    }

    /// Ends the holds of the resumes answered this turn (see `finish_broker_resume`).
    pub(super) fn release_holds(&mut self) {
        for topic in std::mem::take(&mut self.releases) {
            if let Upstream::ViaBroker(cluster) = &mut self.upstream {
                cluster.release(&topic);
            }
            self.stop_listening_unless_subscribed(&topic);
        }
    }

    /// After an interest change: a topic the node no longer listens to loses its copy
    /// (publications in flight from the old subscription are not kept either).
    pub(super) fn stop_listening_unless_subscribed(&mut self, topic: &str) {
        let Upstream::ViaBroker(cluster) = &self.upstream else {
            return;
        };
        if cluster.listens_to(topic) || !self.listening.remove(topic) {
            return;
        }
        self.relayed.remove(topic);
        if let Some(history) = self.history.as_mut() {
            history.forget(topic);
        }
    }

    /// A publication from the broker at `position`: a jump means this node missed
    /// some while listening (its link was down), and its clients of the topic resume
    /// (`server/resume.rs`); a topic it listens to is kept in its copy.
    pub(super) fn on_broker_position(
        &mut self,
        topic: &str,
        position: &Position,
        frame: &bytes::Bytes,
        now: Instant,
    ) {
        if !self.listening.contains(topic) {
            return; // in flight from a subscription that ended
        }
        self.check_relayed_position(topic, position, now);
        if let Some(history) = self.history.as_mut() {
            history.record(topic, position, frame.clone(), now);
        }
    }

    /// Resumes past [`BROKER_RESUME_WAIT`]: answered `broker_unavailable`.
    pub(super) fn expire_broker_resumes(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .broker_resumes
            .iter()
            .filter(|(_, r)| r.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        for id in late {
            if let Some(resume) = self.broker_resumes.remove(&id) {
                tracing::warn!(
                    topic = resume.topic,
                    "a resume got no answer from the broker in time"
                );
                self.finish_broker_resume(resume, Err(NotRecovered::BrokerUnavailable), None);
            }
        }
    }

    /// When [`Server::expire_broker_resumes`] has work.
    pub(super) fn next_broker_resume_deadline(&self) -> Option<Instant> {
        self.broker_resumes.values().map(|r| r.deadline).min()
    }
}
