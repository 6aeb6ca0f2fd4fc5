//! Resuming a topic from a position: what a client that was away gets when it
//! subscribes again with the last position it saw (see `history` and `commands`).
//!
//! The race this closes: publications keep coming while a client resumes. Offsets
//! are given in publication order, fan-outs run in that order too, and a
//! publication's recipients are fixed when its fan-out starts. So a client that joins
//! the topic now gets, live, every publication of the topic still waiting in this
//! process's queue, and none of those already started. Its recovery therefore holds
//! the kept publications after its position and *before the first one still
//! waiting*: each publication reaches it exactly once, in order.
//!
//! Where the history is:
//! - a single process keeps it: the client joins and recovers in one step;
//! - workers ask their master, which keeps the node's history and sends every
//!   publication to every worker in offset order. The worker does not join the client
//!   yet: it sends `Recover`, and the master answers on the same channel after every
//!   publication the answer covers, so when the worker reads the answer it holds all
//!   of them (fanned out or queued) and the single-process rule applies as is. A
//!   connection that goes away meanwhile drops its pending resumes (`Registry::remove`).

use std::time::Instant;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::commands;
use crate::connection::{End, Next, PhaseKind, SendError};
use crate::control::Message;
use crate::envelope::{envelope_frame, put_position};
use crate::history::{NotRecovered, Position, Recovery};
use crate::upstream::Upstream;

use super::Server;

impl Server {
    /// Whether a resume must ask the master (a worker of a server with history).
    pub(super) fn resumes_via_master(&self) -> bool {
        self.config.history.enabled() && matches!(self.upstream, Upstream::ViaMaster(_))
    }

    /// A worker: asks the master for `topic`'s publications after `since`; the
    /// client joins the topic and gets its answer when the master's comes
    /// ([`Server::on_recovered`]).
    pub(super) fn ask_master_to_recover(&mut self, key: usize, topic: &str, since: (u64, String)) {
        let Upstream::ViaMaster(link) = &mut self.upstream else {
            return;
        };
        let request = self.registry.next_resume;
        self.registry.next_resume = request.wrapping_add(1);
        self.registry
            .resumes
            .insert(request, (key, topic.to_string()));
        link.send(&Message::Recover {
            request,
            topic: topic.to_string(),
            offset: since.0,
            epoch: since.1,
        });
    }

    /// The master answered a resume: join the client, answer it, send what it missed.
    pub(super) fn on_recovered(
        &mut self,
        request: u32,
        outcome: Result<Vec<(u64, Vec<u8>)>, NotRecovered>,
        position: Option<Position>,
        now: Instant,
    ) {
        let Some((key, topic)) = self.registry.resumes.remove(&request) else {
            return; // the connection went away meanwhile
        };
        let open = self
            .registry
            .conns
            .get(key)
            .is_some_and(|c| c.kind() == PhaseKind::Open);
        if !open {
            return;
        }
        let subscribed = self
            .registry
            .topics
            .id(&topic)
            .is_some_and(|id| self.registry.conns[key].is_subscribed(id));
        if !subscribed {
            self.registry.subscribe(key, &topic);
        }
        let recovery = match (outcome, position) {
            (Ok(publications), Some(position)) => Recovery::Recovered {
                publications: publications
                    .into_iter()
                    .map(|(offset, frame)| (offset, Bytes::from(frame)))
                    .collect(),
                position,
            },
            (Ok(_), None) => Recovery::NotRecovered {
                reason: NotRecovered::NoHistory,
                position: None,
            },
            (Err(reason), position) => Recovery::NotRecovered { reason, position },
        };
        let (fields, frames) = self.answer_recovery(&topic, recovery);
        let answer = commands::ok_reply_with("subscribe", &topic, fields);
        let next = self.reply_then_recovered(key, &answer, &frames);
        self.registry.after(key, PhaseKind::Open, next);
        let _ = now;
    }

    /// For a client that has just joined `topic` in a process that keeps history (or
    /// keeps none): the fields of its answer and the missed publications to send
    /// after it.
    pub(super) fn resume(
        &mut self,
        topic: &str,
        since: Option<&(u64, String)>,
        now: Instant,
    ) -> (Map<String, Value>, Vec<Bytes>) {
        let Some(history) = self.history.as_mut() else {
            let mut fields = Map::new();
            if since.is_some() {
                fields.insert("recovered".into(), false.into());
                fields.insert("reason".into(), NotRecovered::NoHistory.as_str().into());
            }
            return (fields, Vec::new());
        };
        let Some((offset, epoch)) = since else {
            let mut fields = Map::new();
            if let Some(position) = history.position(topic) {
                put_position(&mut fields, &position);
            }
            return (fields, Vec::new());
        };
        let recovery = history.recover(topic, epoch, *offset, now);
        self.answer_recovery(topic, recovery)
    }

    /// The answer's fields (`recovered`, `reason`, the topic's position) and the
    /// envelopes to send after it: the recovered publications before the first one of
    /// the topic still waiting in this process's queue (see the module doc).
    fn answer_recovery(
        &mut self,
        topic: &str,
        recovery: Recovery,
    ) -> (Map<String, Value>, Vec<Bytes>) {
        let mut fields = Map::new();
        match recovery {
            Recovery::Recovered {
                publications,
                position,
            } => {
                let first_waiting = self.publications.first_waiting_offset(topic);
                let frames = publications
                    .iter()
                    .filter(|(offset, _)| first_waiting.is_none_or(|w| *offset < w))
                    .map(|(offset, frame)| {
                        envelope_frame(Some(topic), Some((*offset, &position.epoch)), frame)
                    })
                    .collect();
                fields.insert("recovered".into(), true.into());
                put_position(&mut fields, &position);
                self.registry.counters.recoveries += 1;
                (fields, frames)
            }
            Recovery::NotRecovered { reason, position } => {
                fields.insert("recovered".into(), false.into());
                fields.insert("reason".into(), reason.as_str().into());
                if let Some(position) = position {
                    put_position(&mut fields, &position);
                }
                self.registry.counters.count_not_recovered(reason);
                (fields, Vec::new())
            }
        }
    }

    /// Sends a subscribe's answer, then the recovered publications.
    pub(super) fn reply_then_recovered(
        &mut self,
        key: usize,
        answer: &str,
        frames: &[Bytes],
    ) -> Next {
        match self.reply(key, answer) {
            Next::Keep => self.send_recovered(key, frames),
            next => next,
        }
    }

    /// Sends the missed publications of a recovery (after its answer).
    fn send_recovered(&mut self, key: usize, frames: &[Bytes]) -> Next {
        let registry = &mut self.registry;
        let Some(conn) = registry.conns.get_mut(key) else {
            return Next::Keep;
        };
        if conn.kind() != PhaseKind::Open {
            return Next::Keep;
        }
        for frame in frames {
            match conn.send(frame, &registry.limits) {
                Ok(()) => registry.counters.frames_out += 1,
                Err(SendError::Overflow) => return Next::Remove(End::SlowConsumer),
                Err(SendError::Io(_)) => return Next::Remove(End::Io),
            }
        }
        Next::Keep
    }
}
