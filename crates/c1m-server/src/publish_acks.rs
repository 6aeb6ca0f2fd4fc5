//! Delivery counts of a publish through the cluster (`--broker`).
//!
//! On one node `POST /publish` answers `{"delivered": N}`. Through a cluster the
//! publishing node cannot count other nodes' connections itself, so every node that
//! delivers a publication sends back how many it reached (`broker::Command::Ack`), and
//! the publisher answers once the broker confirmed the publish and every node it
//! expects has answered, or after [`ACK_WAIT`] with what it has; the answer says
//! whether every expected node counted (`complete`), so a partial count is never
//! mistaken for a whole one.
//!
//! The nodes it expects are those with subscribers of the topic in their last report
//! (`node_stats::ClusterView`; every node for a broadcast): a node without any never
//! receives the publication (it subscribes to a topic's subject only while it has
//! subscribers), so it could not answer. A node whose first subscriber arrived since
//! its last report (≤ 1 s) is not expected; its count is added if it comes before the
//! answer.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::history::Position;
use crate::target::Target;

/// Longest a publish waits for the nodes' counts (from the moment it was sent).
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// How a publish ended: its answer, or refused by the broker (or no confirmation).
#[derive(Debug, PartialEq)]
pub enum Finished<T> {
    Delivered(T, Value),
    Refused(T),
}

#[derive(Debug)]
struct Pending<T> {
    who: T,
    target: Target,
    expected: HashSet<String>,
    confirmed: bool,
    /// Where the broker put it in the topic's history (a topic with history).
    position: Option<Position>,
    nodes: HashSet<String>,
    delivered: u64,
    deadline: Instant,
}

impl<T> Pending<T> {
    fn done(&self) -> bool {
        self.confirmed && self.expected.is_subset(&self.nodes)
    }

    fn answer(self) -> Finished<T> {
        let mut body = json!({
            "published": true,
            "delivered": self.delivered,
            "nodes": self.nodes.len(),
            "nodes_expected": self.expected.len(),
            "complete": self.expected.is_subset(&self.nodes),
        });
        if let Target::Topic(name) = self.target {
            body["topic"] = name.into();
        }
        if let Some(position) = self.position {
            body["offset"] = position.offset.into();
            body["epoch"] = position.epoch.into();
        }
        Finished::Delivered(self.who, body)
    }
}

/// The publishes of this node waiting for the broker's confirmation and the nodes'
/// counts; `T` identifies who to answer (an HTTP connection, or a worker's request).
#[derive(Debug)]
pub struct PublishAcks<T> {
    pending: HashMap<u64, Pending<T>>,
}

impl<T> Default for PublishAcks<T> {
    fn default() -> Self {
        PublishAcks {
            pending: HashMap::new(),
        }
    }
}

impl<T> PublishAcks<T> {
    /// Publish `id` was handed to the broker; the `expected` nodes should answer.
    pub fn start(
        &mut self,
        id: u64,
        who: T,
        target: Target,
        expected: HashSet<String>,
        now: Instant,
    ) {
        self.pending.insert(
            id,
            Pending {
                who,
                target,
                expected,
                confirmed: false,
                position: None,
                nodes: HashSet::new(),
                delivered: 0,
                deadline: now + ACK_WAIT,
            },
        );
    }

    /// The broker confirmed (or refused) publish `id`.
    pub fn confirmed(
        &mut self,
        id: u64,
        ok: bool,
        position: Option<Position>,
    ) -> Option<Finished<T>> {
        if !ok {
            return self.pending.remove(&id).map(|p| Finished::Refused(p.who));
        }
        let pending = self.pending.get_mut(&id)?;
        pending.confirmed = true;
        pending.position = position;
        self.finish_if_done(id)
    }

    /// Node `node` delivered publish `id` to `delivered` connections (a second count
    /// from the same node is ignored).
    pub fn ack(&mut self, id: u64, node: String, delivered: u64) -> Option<Finished<T>> {
        let pending = self.pending.get_mut(&id)?;
        if pending.nodes.insert(node) {
            pending.delivered += delivered;
        }
        self.finish_if_done(id)
    }

    fn finish_if_done(&mut self, id: u64) -> Option<Finished<T>> {
        if self.pending.get(&id)?.done() {
            return self.pending.remove(&id).map(Pending::answer);
        }
        None
    }

    /// Publishes past their deadline: answered with the counts that came (or refused,
    /// if the broker never confirmed them).
    pub fn expire(&mut self, now: Instant) -> Vec<Finished<T>> {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| now >= p.deadline)
            .map(|(id, _)| *id)
            .collect();
        late.into_iter()
            .filter_map(|id| self.pending.remove(&id))
            .map(|p| {
                if p.confirmed {
                    p.answer()
                } else {
                    Finished::Refused(p.who)
                }
            })
            .collect()
    }

    /// The earliest deadline, for the event loop's timeout.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic(name: &str) -> Target {
        Target::Topic(name.into())
    }

    fn nodes(names: &[&str]) -> HashSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    #[test]
    fn answered_when_confirmed_and_every_expected_node_counted() {
        let now = Instant::now();
        let mut acks = PublishAcks::default();
        acks.start(1, "client", topic("a"), nodes(&["n1", "n2"]), now);
        // A count may come before the broker's confirmation.
        assert_eq!(acks.ack(1, "n1".into(), 5), None);
        assert_eq!(acks.ack(1, "n1".into(), 5), None, "counted once per node");
        assert_eq!(acks.confirmed(1, true, None), None);
        // A node not expected (a new subscriber since its report) adds its count but
        // does not stand in for an expected one.
        assert_eq!(acks.ack(1, "n9".into(), 1), None);
        match acks.ack(1, "n2".into(), 7) {
            Some(Finished::Delivered("client", body)) => {
                assert_eq!(body["delivered"], 13);
                assert_eq!(body["nodes"], 3);
                assert_eq!(body["nodes_expected"], 2);
                assert_eq!(body["complete"], true);
                assert_eq!(body["topic"], "a");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(acks.ack(1, "n3".into(), 1), None, "late counts are dropped");
        // Nobody has subscribers: answered on the broker's confirmation.
        acks.start(2, "other", topic("empty"), HashSet::new(), now);
        match acks.confirmed(2, true, None) {
            Some(Finished::Delivered("other", body)) => assert_eq!(body["delivered"], 0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn refusals_and_deadlines() {
        let now = Instant::now();
        let mut acks = PublishAcks::default();
        let three = nodes(&["n1", "n2", "n3"]);
        acks.start(1, 'a', Target::All, three.clone(), now);
        acks.start(2, 'b', topic("t"), three.clone(), now);
        acks.start(3, 'c', topic("t"), three, now + Duration::from_secs(1));
        assert_eq!(acks.confirmed(2, false, None), Some(Finished::Refused('b')));
        acks.confirmed(1, true, None);
        acks.ack(1, "n1".into(), 4);
        assert_eq!(acks.next_deadline(), Some(now + ACK_WAIT));
        let expired = acks.expire(now + ACK_WAIT);
        match &expired[..] {
            [Finished::Delivered('a', body)] => {
                assert_eq!(body["delivered"], 4);
                assert_eq!(body["nodes"], 1);
                assert_eq!(body["nodes_expected"], 3);
                assert_eq!(body["complete"], false);
                assert!(body.get("topic").is_none(), "a broadcast has no topic");
            }
            other => panic!("{other:?}"),
        }
        // Never confirmed by its deadline: refused, not "delivered to 0".
        let expired = acks.expire(now + ACK_WAIT + Duration::from_secs(1));
        assert_eq!(expired, [Finished::Refused('c')]);
        assert_eq!(acks.next_deadline(), None);
    }
}
