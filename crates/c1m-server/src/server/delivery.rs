//! Every publication goes out through [`Server::deliver`]: the clock, an HTTP publish,
//! the master and the broker alike. It picks the recipients and hands the frame to the
//! fan-out (`fanout.rs`); test faults choose recipients here, never inside the loop.

use std::time::Instant;

use bytes::Bytes;

use crate::connection::PhaseKind;
use crate::fanout::{fan_out, Recipients};
use crate::target::Target;
use crate::topics::TopicId;

use super::Server;

impl Server {
    /// The one fan-out entry point: a publication to `target`, whether from the clock,
    /// an HTTP publish, the master or the broker. Returns how many connections it
    /// reached (none while shutting down: the clients are being closed).
    pub(super) fn deliver(&mut self, target: &Target, frame: &Bytes) -> u64 {
        if self.shutdown_deadline.is_some() {
            return 0;
        }
        let topic = match target {
            Target::All => None,
            Target::Topic(name) => match self.registry.topics.id(name) {
                Some(id) => Some(id),
                None => return 0, // nobody here has subscribed to it
            },
        };
        if let Some(id) = topic {
            self.registry.topics.count_published(id);
        }
        let faulty = self.recipients_with_faults(topic);
        let registry = &mut self.registry;
        let recipients = match (&faulty, topic) {
            (Some(keys), _) => Recipients::Keys(keys),
            (None, Some(id)) => Recipients::Keys(registry.topics.subscribers(id)),
            (None, None) => Recipients::EveryOpen,
        };
        let out = fan_out(frame, &mut registry.conns, recipients, &registry.limits);
        let now = Instant::now();
        for (key, end) in out.failed {
            self.registry
                .end_failed(self.poll.registry(), key, end, now);
        }
        let stats = &mut self.registry.counters;
        stats.broadcasts += 1;
        stats.frames_out += out.sent;
        stats.bytes_out += out.sent * frame.len() as u64;
        stats.dropped += out.dropped;
        stats.last_fanout = out.took;
        self.fanout_seconds.observe(out.took);
        tracing::debug!(
            sent = out.sent,
            fanout_ms = out.took.as_secs_f64() * 1e3,
            "fan-out done"
        );
        out.sent
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
