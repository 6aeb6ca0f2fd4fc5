//! Resuming a topic from a position: what a client that was away gets when it
//! subscribes again with the last position it saw (see `history` and `commands`).
//!
//! The race this closes: publications keep coming while a client resumes. Offsets
//! are given in publication order and fan-outs run in that order too, and a
//! publication's recipients are fixed when its fan-out starts. So a client that joins
//! the topic now gets, live, every publication of the topic still waiting in this
//! process's queue, and none of those already started. Its recovery therefore holds
//! the kept publications after its position and *before the first one still
//! waiting*: each publication reaches it exactly once, in order, whatever is in
//! flight.

use std::time::Instant;

use bytes::Bytes;
use serde_json::{Map, Value};

use crate::envelope::{envelope_frame, put_position};
use crate::history::{NotRecovered, Recovery};

use super::Server;

impl Server {
    /// For a client that has just joined `topic`: the fields its answer carries
    /// (`recovered` and `reason` when it gave a position `since`, and the topic's
    /// position when it has history) and the missed publications, as envelopes, to
    /// send right after the answer.
    pub(super) fn resume(
        &mut self,
        topic: &str,
        since: Option<&(u64, String)>,
        now: Instant,
    ) -> (Map<String, Value>, Vec<Bytes>) {
        let mut fields = Map::new();
        let not_recovered = |fields: &mut Map<String, Value>, reason: NotRecovered| {
            fields.insert("recovered".into(), false.into());
            fields.insert("reason".into(), reason.as_str().into());
        };
        let Some(history) = self.history.as_mut() else {
            if since.is_some() {
                not_recovered(&mut fields, NotRecovered::NoHistory);
            }
            return (fields, Vec::new());
        };
        let Some((offset, epoch)) = since else {
            if let Some(position) = history.position(topic) {
                put_position(&mut fields, &position);
            }
            return (fields, Vec::new());
        };
        match history.recover(topic, epoch, *offset, now) {
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
                not_recovered(&mut fields, reason);
                if let Some(position) = position {
                    put_position(&mut fields, &position);
                }
                self.registry.counters.count_not_recovered(reason);
                (fields, Vec::new())
            }
        }
    }

    /// Sends the missed publications of a recovery (after its answer).
    pub(super) fn send_recovered(
        &mut self,
        key: usize,
        frames: &[Bytes],
    ) -> crate::connection::Next {
        use crate::connection::{End, Next, PhaseKind, SendError};
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
