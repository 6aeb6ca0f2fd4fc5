//! Every publication goes out through [`Server::publish_at`]: the clock, an HTTP publish,
//! the master and the broker alike. Publications wait in one FIFO and go out one at a
//! time, each a slice of `--fanout-slice` connections per turn of the event loop
//! (`fanout::Broadcast`), so accepting, handshakes, pongs and closes are served during
//! a long broadcast, and every connection still gets messages in publication order.
//! What a publication's count is for (an HTTP answer, the master, the broker) is done
//! when its last slice is.
//!
//! Bounds: at most [`MAX_QUEUED_PUBLICATIONS`] wait behind the running one. Past it a
//! local `POST /publish` gets 503 with `Retry-After`, and this process stops reading
//! its master's channel or the broker's events until the queue has room again (the
//! master then skips a worker whose channel stays full, counted as
//! `c1m_publications_skipped_total`). Clock ticks coalesce: a tick that finds an older
//! one still queued replaces it (`c1m_clock_ticks_coalesced_total`), since a late time
//! is worthless; a client of a busy server sees fewer, never stale-ordered, ticks.
//! Test faults choose recipients here, never inside the fan-out.

use crate::pusher::SocketRef;
use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use crate::broker::Reply;
use crate::connection::PhaseKind;
use crate::control::{Message, Origin};
use crate::fanout::{Broadcast, EnvelopeFields, Recipients};
use crate::history::Position;
use crate::target::{Delivery, Target};
use crate::topics::TopicId;
use crate::upstream::{Upstream, Waiting};

use super::Server;

/// Publications that may wait behind the one being fanned out.
pub const MAX_QUEUED_PUBLICATIONS: usize = 256;

/// What a publication's count is for, once its fan-out is over.
#[derive(Debug)]
pub(super) enum WhenDelivered {
    /// A clock tick: nobody waits for it.
    Clock,
    /// A `POST /publish` to this process alone: answer its client.
    Answer(Waiting),
    /// A publication the master relayed (not a clock tick): report the count.
    TellMaster(Origin),
    /// A publication from the broker: acknowledge the count to its publisher.
    AckBroker(Reply),
}

#[derive(Debug)]
struct Queued {
    target: Target,
    frame: Bytes,
    /// Its topic's history position, if the topic keeps history.
    position: Option<Position>,
    /// A Pusher socket to leave out (see `fanout::EnvelopeFields::exclude`).
    exclude: Option<SocketRef>,
    then: WhenDelivered,
}

#[derive(Debug)]
struct Running {
    broadcast: Broadcast,
    then: WhenDelivered,
}

/// The publications of this process: the one being fanned out and those waiting.
#[derive(Debug, Default)]
pub(super) struct Publications {
    running: Option<Running>,
    queued: VecDeque<Queued>,
    /// Test fault `--fault-slice-pause`: no slice before this time.
    next_slice_at: Option<Instant>,
}

impl Publications {
    /// Whether another publication may be queued.
    pub(super) fn has_room(&self) -> bool {
        self.queued.len() < MAX_QUEUED_PUBLICATIONS
    }

    /// Whether a fan-out has work: the loop must not sleep past `deadline`.
    pub(super) fn deadline(&self, now: Instant) -> Option<Instant> {
        if self.running.is_none() && self.queued.is_empty() {
            return None;
        }
        Some(self.next_slice_at.unwrap_or(now))
    }

    /// Waiting plus running.
    pub(super) fn len(&self) -> usize {
        self.queued.len() + usize::from(self.running.is_some())
    }

    /// Whether a fan-out to `topic` is running now.
    pub(super) fn running_to(&self, topic: &str) -> bool {
        self.running
            .as_ref()
            .is_some_and(|r| r.broadcast.topic() == Some(topic))
    }

    /// The lowest offset of `topic` above `since` still waiting (not started): a
    /// resumed client at `since` joins the topic right before it starts, so gets it and
    /// every later one live, and its recovery must stop just before it. `None` when
    /// none is waiting.
    pub(super) fn first_waiting_above(&self, topic: &str, since: u64) -> Option<u64> {
        self.waiting_offsets(topic).filter(|&o| o > since).min()
    }

    /// Whether a client at offset `since` of `topic` must wait to join: while a fan-out
    /// to the topic runs (its recipients were fixed by slab key, and the key may have
    /// had a subscribed owner then), or while a publication of the topic at or below
    /// `since` waits (the client has it already: this worker may lag the one it came
    /// from).
    pub(super) fn blocks_join(&self, topic: &str, since: u64) -> bool {
        self.running_to(topic) || self.waiting_offsets(topic).any(|o| o <= since)
    }

    fn waiting_offsets<'a>(&'a self, topic: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.queued
            .iter()
            .filter(move |q| q.target.topic() == Some(topic))
            .filter_map(|q| q.position.as_ref().map(|p| p.offset))
    }
}

impl Server {
    /// Queues a publication to `target` (with its history `position`, if it has one).
    /// Its fan-out starts at the end of this turn of the loop (`Server::turn_over`),
    /// never inside the read or message handler that published it, so whatever it
    /// answers finds that handler done.
    pub(super) fn publish_at(
        &mut self,
        target: Target,
        frame: Bytes,
        position: Option<Position>,
        then: WhenDelivered,
    ) {
        self.publish_excluding(target, frame, position, None, then);
    }

    /// [`Server::publish_at`], leaving out the Pusher socket `exclude` (a trigger's
    /// `socket_id`), wherever it lives.
    pub(super) fn publish_excluding(
        &mut self,
        target: Target,
        frame: Bytes,
        position: Option<Position>,
        exclude: Option<SocketRef>,
        then: WhenDelivered,
    ) {
        let queue = &mut self.publications.queued;
        // A late time is worthless: a tick drops older ticks still queued, unless they
        // are kept in history (they have an offset, and a gap in offsets is a loss the
        // clients would see).
        if matches!(then, WhenDelivered::Clock) {
            let before = queue.len();
            queue.retain(|q| !matches!(q.then, WhenDelivered::Clock) || q.position.is_some());
            self.registry.counters.ticks_coalesced += (before - queue.len()) as u64;
        }
        queue.push_back(Queued {
            target,
            frame,
            position,
            exclude,
            then,
        });
    }

    /// One slice of fan-out work: up to `--fanout-slice` writes, over as many queued
    /// publications as that covers. Called again each turn while work remains.
    pub(super) fn fan_out_slice(&mut self, now: Instant) {
        if self.shutdown_deadline.is_some() {
            // The clients are being closed: nothing reaches them any more.
            return self.abandon_publications();
        }
        if self.publications.next_slice_at.is_some_and(|at| now < at) {
            return;
        }
        let mut budget = self.config.fanout_slice.max(1);
        while budget > 0 {
            if self.publications.running.is_none() && !self.start_next() {
                break;
            }
            let Some(running) = &mut self.publications.running else {
                break;
            };
            let registry = &mut self.registry;
            let (used, done) =
                running
                    .broadcast
                    .step(&mut registry.conns, &registry.limits, budget);
            budget -= used;
            let failed = running.broadcast.take_failed();
            let now = Instant::now();
            for (key, end) in failed {
                self.registry.end_failed(key, end, now);
            }
            if done {
                self.finish_running();
                self.join_pending(None);
            }
        }
        self.publications.next_slice_at = self
            .config
            .faults
            .slice_pause
            .filter(|_| self.publications.running.is_some())
            .map(|pause| Instant::now() + pause);
    }

    /// Takes the next queued publication and fixes its recipients. Returns false when
    /// nothing is queued.
    fn start_next(&mut self) -> bool {
        while let Some(Queued {
            target,
            frame,
            position,
            exclude,
            then,
        }) = self.publications.queued.pop_front()
        {
            if let (Some(name), Some(position)) = (target.topic(), &position) {
                // Resumed clients that have everything before this one join now,
                // so its recipients include them.
                if !self.registry.pending_joins.is_empty() {
                    self.join_pending(Some((name, position.offset)));
                }
            }
            let topic = match &target {
                Target::All => None,
                Target::Topic(name) => match self.registry.topics.id(name) {
                    Some(id) => Some(id),
                    None => {
                        // Nobody here has subscribed to it.
                        self.delivered(then, 0);
                        continue;
                    }
                },
            };
            if let Some(id) = topic {
                self.registry.topics.count_published(id);
            }
            let recipients = match (self.recipients_with_faults(topic), topic) {
                (Some(keys), _) => Recipients::Keys { keys, topic },
                (None, Some(id)) => Recipients::Keys {
                    keys: self.registry.topics.subscribers(id).to_vec(),
                    topic,
                },
                (None, None) => Recipients::EveryOpen,
            };
            let envelope = EnvelopeFields {
                topic: target.topic().map(str::to_string),
                position,
                exclude,
            };
            self.publications.running = Some(Running {
                broadcast: Broadcast::enveloped(frame, envelope, recipients),
                then,
            });
            return true;
        }
        false
    }

    /// The running publication reached everyone: count it, report it.
    fn finish_running(&mut self) {
        let Some(Running { broadcast, then }) = self.publications.running.take() else {
            return;
        };
        let out = broadcast.progress();
        let stats = &mut self.registry.counters;
        stats.broadcasts += 1;
        stats.frames_out += out.sent;
        stats.bytes_out += out.sent * broadcast.frame().len() as u64;
        stats.dropped += out.dropped;
        stats.last_fanout = out.took;
        self.fanout_seconds.observe(out.took);
        tracing::debug!(
            sent = out.sent,
            fanout_ms = out.took.as_secs_f64() * 1e3,
            "fan-out done"
        );
        let sent = out.sent;
        self.delivered(then, sent);
    }

    /// Does what a publication's count was for.
    fn delivered(&mut self, then: WhenDelivered, count: u64) {
        match then {
            WhenDelivered::Clock => {}
            WhenDelivered::Answer(waiting) => {
                self.answer_publish(waiting, Delivery::whole(count), Instant::now())
            }
            WhenDelivered::TellMaster(origin) => {
                self.send_to_master(&Message::Delivered { origin, count })
            }
            WhenDelivered::AckBroker(reply) => {
                if let Upstream::ViaBroker(cluster) = &self.upstream {
                    cluster.ack(reply, count);
                }
            }
        }
    }

    /// Shutting down: what is running or queued ends with what it reached so far.
    fn abandon_publications(&mut self) {
        if let Some(running) = self.publications.running.take() {
            let sent = running.broadcast.progress().sent;
            self.delivered(running.then, sent);
        }
        for queued in std::mem::take(&mut self.publications.queued) {
            self.delivered(queued.then, 0);
        }
    }

    /// With test faults on (`--fault-skip-every`, `--fault-skip-source`), the
    /// recipients that are not skipped; `None` without faults. Kept out of the
    /// fan-out loop, which stays the same with faults or without.
    fn recipients_with_faults(&self, topic: Option<TopicId>) -> Option<Vec<u32>> {
        let faults = &self.config.faults;
        if faults.skip_every.is_none() && faults.skip_source.is_none() {
            return None;
        }
        let all: Vec<u32> = match topic {
            Some(id) => self.registry.topics.subscribers(id).to_vec(),
            None => self
                .registry
                .conns
                .iter()
                .filter(|(_, c)| c.kind() == PhaseKind::Open)
                .map(|(key, _)| key as u32)
                .collect(),
        };
        let skip_every = faults.skip_every.unwrap_or(0);
        let kept = all
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| skip_every == 0 || !(i + 1).is_multiple_of(skip_every))
            .map(|(_, key)| key)
            .filter(|key| !self.muted.contains(&(*key as usize)))
            .collect();
        Some(kept)
    }
}
