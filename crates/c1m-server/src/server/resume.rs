//! Resuming a topic from a position: what a client that was away gets when it
//! subscribes again with the last position it saw (see `history` and `commands`).
//!
//! The race this closes: publications keep coming while a client resumes. Offsets
//! are given in publication order, fan-outs run in that order too, and a
//! publication's recipients are fixed when its fan-out starts. So a client that joins
//! the topic now gets, live, every publication of the topic still waiting in this
//! process's queue, and none of those already started. Its recovery therefore holds
//! the kept publications after its position and *before the first one above it
//! still waiting*, and it joins right before that one starts: each publication
//! reaches it exactly once, in order. It does not join sooner when this process still
//! has to send a publication at or below its position (workers run at their own pace:
//! the client may come from one that was ahead), nor while a fan-out to the topic
//! runs (its recipients are slab keys, and the client's key may have belonged to a
//! subscriber then). Found by CI: a client that moved to a lagging worker got one
//! publication twice.
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
use c1m_proto::CloseCode;
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
            .insert(request, (key, topic.to_string(), since.0));
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
    ) {
        let Some((key, topic, since)) = self.registry.resumes.remove(&request) else {
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
        self.join_resumed(key, &topic, since);
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
        let (fields, frames) = self.answer_recovery(&topic, since, recovery);
        let answer = commands::ok_reply_with("subscribe", &topic, fields);
        let next = self.reply_then_recovered(key, &answer, &frames);
        self.registry.after(key, PhaseKind::Open, next);
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
        self.answer_recovery(topic, *offset, recovery)
    }

    /// The answer's fields (`recovered`, `reason`, the topic's position) and the
    /// envelopes to send after it: the recovered publications before the first one of
    /// the topic above `since` still waiting in this process's queue (see the module
    /// doc and [`Server::join_resumed`]).
    fn answer_recovery(
        &mut self,
        topic: &str,
        since: u64,
        recovery: Recovery,
    ) -> (Map<String, Value>, Vec<Bytes>) {
        let mut fields = Map::new();
        match recovery {
            Recovery::Recovered {
                publications,
                position,
            } => {
                let first_waiting = self.publications.first_waiting_above(topic, since);
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

    /// Joins a client that resumes `topic` at offset `since`: now, or once nothing
    /// running or waiting could reach it twice (see `Publications::blocks_join`): right
    /// before the first publication above `since` starts, which its recovery stops
    /// short of.
    pub(super) fn join_resumed(&mut self, key: usize, topic: &str, since: u64) {
        if self.publications.blocks_join(topic, since) {
            self.registry
                .pending_joins
                .push((key, topic.to_string(), since));
        } else {
            self.join_once(key, topic);
        }
    }

    /// Joins the waiting clients that may join now: with `starting` (a publication of
    /// a topic at an offset, about to start), those of that topic below it; without,
    /// those nothing blocks any more (a fan-out just ended).
    pub(super) fn join_pending(&mut self, starting: Option<(&str, u64)>) {
        let pending = std::mem::take(&mut self.registry.pending_joins);
        for (key, topic, since) in pending {
            let now = match starting {
                Some((name, offset)) => name == topic && since < offset,
                None => !self.publications.blocks_join(&topic, since),
            };
            if now {
                self.join_once(key, &topic);
            } else {
                self.registry.pending_joins.push((key, topic, since));
            }
        }
    }

    fn join_once(&mut self, key: usize, topic: &str) {
        let registry = &mut self.registry;
        let Some(conn) = registry.conns.get(key) else {
            return;
        };
        let subscribed = registry
            .topics
            .id(topic)
            .is_some_and(|id| conn.is_subscribed(id));
        if conn.kind() == PhaseKind::Open && !subscribed {
            registry.subscribe(key, topic);
        }
    }

    /// A worker got a publication of `topic` at `position` from its master. If the
    /// offsets jumped, the master skipped this worker for some (its channel was full,
    /// see `master::send_to_all`): its clients of the topic that keep positions are
    /// closed with 1013 ("try again later"), so they come back and recover the missed
    /// ones from history instead of silently lacking them. Seed-style clients keep
    /// their connection (they could not recover anything).
    pub(super) fn check_relayed_position(
        &mut self,
        topic: &str,
        position: &Position,
        now: Instant,
    ) {
        let previous = self.relayed.insert(topic.to_string(), position.clone());
        let skipped =
            previous.is_some_and(|p| p.epoch == position.epoch && position.offset > p.offset + 1);
        if !skipped {
            return;
        }
        let registry = &mut self.registry;
        let Some(id) = registry.topics.id(topic) else {
            return;
        };
        let resumers: Vec<usize> = registry
            .topics
            .subscribers(id)
            .iter()
            .map(|&key| key as usize)
            .filter(|&key| {
                registry
                    .conns
                    .get(key)
                    .is_some_and(|c| c.wants_envelope() || c.is_sse())
            })
            .collect();
        tracing::warn!(
            topic,
            clients = resumers.len(),
            "publications skipped for this worker: its clients of the topic resume"
        );
        registry.counters.resumes_forced += resumers.len() as u64;
        for key in resumers {
            registry.close_open(
                key,
                CloseCode::TRY_AGAIN_LATER,
                "missed publications: resume from your position",
                now,
            );
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
            match conn.send_own(frame, &registry.limits) {
                Ok(()) => registry.counters.frames_out += 1,
                Err(SendError::Overflow) => return Next::Remove(End::SlowConsumer),
                Err(SendError::Io(_)) => return Next::Remove(End::Io),
            }
        }
        Next::Keep
    }
}
