//! Publications the master sent to every worker, waiting for their delivery counts.
//!
//! Every relay ends within [`RELAY_WAIT`]: when every worker it was sent to has
//! counted (or died), with the whole count; at its deadline, with what came and
//! `complete: false`. So a worker that stops reading its control channel (stopped,
//! stuck in a fan-out, or skipped for a full queue) delays a publish's answer by a
//! bounded time and leaks nothing.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::broker::Reply;
use crate::control::Origin;
use crate::target::Delivery;

/// Longest the master waits for the workers' counts of one relayed publication.
pub const RELAY_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug)]
struct Relay {
    /// Workers whose count is still awaited.
    awaited: Vec<bool>,
    count: u64,
    /// Whether a worker was skipped (its control queue full): the count cannot be whole.
    skipped: bool,
    deadline: Instant,
    /// For a publication from the broker: where the sum goes (the publishing node).
    reply: Option<Reply>,
}

/// A relay that is over: who to tell, and what it came to.
#[derive(Debug, PartialEq)]
pub struct Counted {
    pub origin: Origin,
    pub delivery: Delivery,
    pub reply: Option<Reply>,
}

#[derive(Debug, Default)]
pub struct Relays {
    pending: HashMap<Origin, Relay>,
}

impl Relays {
    /// A publication from `origin` was sent to the workers marked in `sent_to`
    /// (`false`: dead, or skipped because its queue was full).
    pub fn start(
        &mut self,
        origin: Origin,
        sent_to: Vec<bool>,
        skipped: bool,
        reply: Option<Reply>,
        now: Instant,
    ) {
        self.pending.insert(
            origin,
            Relay {
                awaited: sent_to,
                count: 0,
                skipped,
                deadline: now + RELAY_WAIT,
                reply,
            },
        );
    }

    /// Worker `worker` reached `count` connections with the relay of `origin` (a count
    /// for a relay that is over is ignored).
    pub fn counted(&mut self, origin: Origin, worker: usize, count: u64) {
        if let Some(relay) = self.pending.get_mut(&origin) {
            if relay.awaited.get(worker).copied().unwrap_or(false) {
                relay.awaited[worker] = false;
                relay.count += count;
            }
        }
    }

    /// Worker `worker` died: no count will come from it (its connections are gone, so
    /// the count stays whole).
    pub fn worker_gone(&mut self, worker: usize) {
        for relay in self.pending.values_mut() {
            if let Some(awaited) = relay.awaited.get_mut(worker) {
                *awaited = false;
            }
        }
    }

    /// Relays that are over: every count came, or the deadline passed.
    pub fn take_finished(&mut self, now: Instant) -> Vec<Counted> {
        let over: Vec<Origin> = self
            .pending
            .iter()
            .filter(|(_, r)| now >= r.deadline || !r.awaited.contains(&true))
            .map(|(origin, _)| *origin)
            .collect();
        over.into_iter()
            .filter_map(|origin| {
                let relay = self.pending.remove(&origin)?;
                let complete = !relay.skipped && !relay.awaited.contains(&true);
                Some(Counted {
                    origin,
                    delivery: Delivery::Counted {
                        connections: relay.count,
                        complete,
                    },
                    reply: relay.reply,
                })
            })
            .collect()
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|r| r.deadline).min()
    }

    pub fn len(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(index: u32, request: u32) -> Origin {
        Origin::Worker { index, request }
    }

    #[test]
    fn whole_when_every_worker_counted_or_died() {
        let now = Instant::now();
        let mut relays = Relays::default();
        relays.start(worker(0, 1), vec![true, true, true], false, None, now);
        relays.counted(worker(0, 1), 0, 4);
        relays.counted(worker(0, 1), 0, 4); // counted once
        relays.counted(worker(0, 1), 1, 5);
        assert!(relays.take_finished(now).is_empty());
        relays.worker_gone(2);
        assert_eq!(
            relays.take_finished(now),
            [Counted {
                origin: worker(0, 1),
                delivery: Delivery::whole(9),
                reply: None
            }]
        );
        assert_eq!(relays.len(), 0);
        relays.counted(worker(0, 1), 2, 1); // late: ignored
        assert_eq!(relays.len(), 0);
    }

    #[test]
    fn a_silent_worker_costs_the_bound_and_a_partial_count() {
        let now = Instant::now();
        let mut relays = Relays::default();
        let reply = Reply {
            to: "node".into(),
            id: 3,
        };
        relays.start(
            Origin::Broker { relay: 7 },
            vec![true, true],
            false,
            Some(reply.clone()),
            now,
        );
        relays.counted(Origin::Broker { relay: 7 }, 1, 6);
        assert!(relays.take_finished(now + RELAY_WAIT / 2).is_empty());
        assert_eq!(relays.next_deadline(), Some(now + RELAY_WAIT));
        let over = relays.take_finished(now + RELAY_WAIT);
        assert_eq!(
            over,
            [Counted {
                origin: Origin::Broker { relay: 7 },
                delivery: Delivery::Counted {
                    connections: 6,
                    complete: false
                },
                reply: Some(reply)
            }]
        );
        assert_eq!(relays.len(), 0, "nothing kept");
        // A worker skipped for a full queue makes the count partial at once.
        relays.start(worker(1, 2), vec![true, false], true, None, now);
        relays.counted(worker(1, 2), 0, 2);
        let over = relays.take_finished(now);
        assert_eq!(
            over[0].delivery,
            Delivery::Counted {
                connections: 2,
                complete: false
            }
        );
    }
}
