//! Presence membership across a cluster, sans-I/O: every node keeps the whole
//! cluster's members of every presence channel in its own [`Presence`] table, and
//! tells the others about its own sockets over the broker.
//!
//! Why a replica per node rather than one table in the broker (a Redis hash, NATS KV):
//! a newcomer's `subscription_succeeded` lists the members at once, from memory, and
//! member events are made by each node for its own subscribers (never sent twice, never
//! through the broker as publications); the broker carries only the small changes, and
//! Redis and NATS both serve it with the plain publish/subscribe c1m already uses.
//!
//! The consistency this gives (docs/server.md, "Presence in a cluster"):
//! - each node's own sockets are exact in its table; another node's arrive in the
//!   order that node sent them (one publisher, one connection), a broker round trip
//!   later;
//! - a node announces all its sockets (`State`) when its link comes up, and asks the
//!   others for theirs: a node that restarts, or lost the broker for a while, converges
//!   by diffing each node's announced state against what it held;
//! - a node not heard from (no report, no presence message) for
//!   `node_stats::STALE_AFTER` is gone: its sockets leave, and members are told.
//!   A node that was only cut off announces itself again when it is back.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::node_stats::STALE_AFTER;
use crate::presence::{Change, Member, Presence};
use crate::pusher::SocketRef;

/// Owners at or above this are other nodes; below are this node's own (0 for a
/// single process, the worker index for a master).
pub const REMOTE_OWNERS: u32 = 1 << 20;

/// Most sockets one `State` message carries (a node with more sends several parts;
/// the receiver applies them once the last part is in).
const STATE_CHUNK: usize = 2000;

/// What goes over the broker.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Wire {
    Join {
        node: String,
        channel: String,
        socket: SocketRef,
        user_id: Value,
        user_info: Value,
    },
    Leave {
        node: String,
        channel: String,
        socket: SocketRef,
    },
    /// Part `part` of `parts` of every socket `node` holds; `ask`: the others answer
    /// with theirs (the node's link just came up). The first part also lists the
    /// channels with subscribers on the node (with webhooks).
    State {
        node: String,
        ask: bool,
        part: usize,
        parts: usize,
        sockets: Vec<(String, SocketRef, Value, Value)>,
        #[serde(default)]
        occupied: Vec<String>,
    },
    /// The app asked (on `node`) to close every connection in a user's channel
    /// `topic` (`terminate_connections`).
    Terminate { node: String, topic: String },
    /// `channel` got its first (`on`) or lost its last subscriber on `node` (sent
    /// with webhooks, so that `channel_occupied`/`vacated` go out once per cluster).
    Occupancy {
        node: String,
        channel: String,
        on: bool,
    },
}

/// What a message from the broker came to.
#[derive(Debug, Default, PartialEq)]
pub struct Applied {
    /// Member events to deliver to this node's subscribers, by channel.
    pub changes: Vec<(String, Change)>,
    /// Another node asked for every node's state: send [`ClusterPresence::state`].
    pub state_wanted: bool,
    /// Close the connections in this user's channel (a topic).
    pub terminate: Option<String>,
}

/// What nodes that went silent took with them.
#[derive(Debug, Default, PartialEq)]
pub struct Expired {
    /// Member events to deliver to this node's subscribers, by channel.
    pub changes: Vec<(String, Change)>,
    /// Channels no other node has subscribers of any more.
    pub vacated: Vec<String>,
}

/// One node's replication state: which owner id stands for which other node, and when
/// each was last heard from.
#[derive(Debug)]
pub struct ClusterPresence {
    node: String,
    owners: HashMap<String, u32>,
    next_owner: u32,
    heard: HashMap<String, Instant>,
    /// A `State` being received in parts: node → sockets so far.
    partial: HashMap<String, Vec<(String, SocketRef, Value, Value)>>,
    /// Channels with subscribers on other nodes, and which (with webhooks).
    occupied: HashMap<String, HashSet<String>>,
}

impl ClusterPresence {
    pub fn new(node: &str) -> ClusterPresence {
        ClusterPresence {
            node: node.to_string(),
            owners: HashMap::new(),
            next_owner: REMOTE_OWNERS,
            heard: HashMap::new(),
            partial: HashMap::new(),
            occupied: HashMap::new(),
        }
    }

    /// This node's socket joined `channel` as `member` (already in the table).
    pub fn join(&self, channel: &str, socket: SocketRef, member: &Member) -> Vec<u8> {
        encode(&Wire::Join {
            node: self.node.clone(),
            channel: channel.to_string(),
            socket,
            user_id: member.user_id.clone(),
            user_info: member.user_info.clone(),
        })
    }

    /// This node's socket left `channel`.
    pub fn leave(&self, channel: &str, socket: SocketRef) -> Vec<u8> {
        encode(&Wire::Leave {
            node: self.node.clone(),
            channel: channel.to_string(),
            socket,
        })
    }

    /// `channel` got its first (`on`) or lost its last subscriber on this node.
    pub fn occupancy(&self, channel: &str, on: bool) -> Vec<u8> {
        encode(&Wire::Occupancy {
            node: self.node.clone(),
            channel: channel.to_string(),
            on,
        })
    }

    /// The app asked this node to close the connections in a user's channel `topic`:
    /// the others too.
    pub fn terminate(&self, topic: &str) -> Vec<u8> {
        encode(&Wire::Terminate {
            node: self.node.clone(),
            topic: topic.to_string(),
        })
    }

    /// Whether another node has subscribers of `channel` (as far as this node heard).
    pub fn others_occupy(&self, channel: &str) -> bool {
        self.occupied
            .get(channel)
            .is_some_and(|nodes| !nodes.is_empty())
    }

    /// Every socket this node holds (owners below [`REMOTE_OWNERS`]) and the
    /// channels it has subscribers of, as messages; `ask`: the others answer with theirs.
    pub fn state(&self, table: &Presence, occupied: &[String], ask: bool) -> Vec<Vec<u8>> {
        let sockets: Vec<(String, SocketRef, Value, Value)> = table
            .held_where(|owner| owner < REMOTE_OWNERS)
            .into_iter()
            .map(|(channel, socket, m)| (channel, socket, m.user_id, m.user_info))
            .collect();
        let chunks: Vec<&[(String, SocketRef, Value, Value)]> = if sockets.is_empty() {
            vec![&[]]
        } else {
            sockets.chunks(STATE_CHUNK).collect()
        };
        let parts = chunks.len();
        chunks
            .into_iter()
            .enumerate()
            .map(|(part, chunk)| {
                encode(&Wire::State {
                    node: self.node.clone(),
                    ask,
                    part,
                    parts,
                    sockets: chunk.to_vec(),
                    occupied: if part == 0 {
                        occupied.to_vec()
                    } else {
                        Vec::new()
                    },
                })
            })
            .collect()
    }

    /// Applies a message from the broker to `table` (this node's own are skipped:
    /// its table already has them). `Err`: a malformed message (logged by the caller).
    pub fn apply(
        &mut self,
        table: &mut Presence,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Applied, String> {
        let wire: Wire =
            serde_json::from_slice(bytes).map_err(|e| format!("bad presence message: {e}"))?;
        let node = match &wire {
            Wire::Join { node, .. }
            | Wire::Leave { node, .. }
            | Wire::State { node, .. }
            | Wire::Occupancy { node, .. }
            | Wire::Terminate { node, .. } => node.clone(),
        };
        if node == self.node {
            return Ok(Applied::default());
        }
        self.heard.insert(node.clone(), now);
        let owner = self.owner(&node);
        let mut applied = Applied::default();
        match wire {
            Wire::Join {
                channel,
                socket,
                user_id,
                user_info,
                ..
            } => {
                let member = Member { user_id, user_info };
                // A full channel: the joining node refused it already when full there;
                // a race between nodes may overfill it by a few, never crash.
                if let Ok(Some(change)) = table.join(&channel, socket, owner, member) {
                    applied.changes.push((channel, change));
                }
            }
            Wire::Leave {
                channel, socket, ..
            } => {
                if let Some(change) = table.leave(&channel, socket) {
                    applied.changes.push((channel, change));
                }
            }
            Wire::Occupancy { channel, on, .. } => self.occupy(&node, channel, on),
            Wire::Terminate { topic, .. } => applied.terminate = Some(topic),
            Wire::State {
                ask,
                part,
                parts,
                sockets,
                occupied,
                ..
            } => {
                applied.state_wanted = ask;
                if part == 0 {
                    for nodes in self.occupied.values_mut() {
                        nodes.remove(&node);
                    }
                    self.occupied.retain(|_, nodes| !nodes.is_empty());
                    for channel in occupied {
                        self.occupy(&node, channel, true);
                    }
                }
                let so_far = self.partial.entry(node.clone()).or_default();
                if part == 0 {
                    so_far.clear();
                }
                so_far.extend(sockets);
                if part + 1 >= parts {
                    let whole = self.partial.remove(&node).unwrap_or_default();
                    applied.changes = replace_owner(table, owner, whole);
                }
            }
        }
        Ok(applied)
    }

    fn occupy(&mut self, node: &str, channel: String, on: bool) {
        if on {
            self.occupied
                .entry(channel)
                .or_default()
                .insert(node.to_string());
        } else if let Some(nodes) = self.occupied.get_mut(&channel) {
            nodes.remove(node);
            if nodes.is_empty() {
                self.occupied.remove(&channel);
            }
        }
    }

    /// Other nodes not heard from (here or by `reported`, their last report's time)
    /// within `STALE_AFTER`: their sockets leave. The member changes by channel, and
    /// the channels no other node has subscribers of any more.
    pub fn expire(
        &mut self,
        table: &mut Presence,
        reported: impl Fn(&str) -> Option<Instant>,
        now: Instant,
    ) -> Expired {
        let gone: Vec<String> = self
            .owners
            .keys()
            .filter(|node| {
                let last = [self.heard.get(*node).copied(), reported(node)]
                    .into_iter()
                    .flatten()
                    .max();
                last.is_none_or(|at| now.saturating_duration_since(at) > STALE_AFTER)
            })
            .cloned()
            .collect();
        let mut expired = Expired::default();
        for node in gone {
            if let Some(owner) = self.owners.remove(&node) {
                expired.changes.extend(table.leave_owner(owner));
            }
            self.heard.remove(&node);
            self.partial.remove(&node);
            for (channel, nodes) in self.occupied.iter_mut() {
                if nodes.remove(&node) && nodes.is_empty() {
                    expired.vacated.push(channel.clone());
                }
            }
            self.occupied.retain(|_, nodes| !nodes.is_empty());
        }
        expired
    }

    /// The owner id standing for `node` in the table.
    fn owner(&mut self, node: &str) -> u32 {
        if let Some(&owner) = self.owners.get(node) {
            return owner;
        }
        let owner = self.next_owner;
        self.next_owner = self.next_owner.wrapping_add(1).max(REMOTE_OWNERS);
        self.owners.insert(node.to_string(), owner);
        owner
    }
}

/// Makes `owner`'s sockets in `table` exactly `sockets`: those gone leave, new ones
/// join, the rest stay (no events for them).
fn replace_owner(
    table: &mut Presence,
    owner: u32,
    sockets: Vec<(String, SocketRef, Value, Value)>,
) -> Vec<(String, Change)> {
    let now_held: HashSet<(String, SocketRef)> = sockets
        .iter()
        .map(|(channel, socket, ..)| (channel.clone(), *socket))
        .collect();
    let mut changes = Vec::new();
    for (channel, socket, _) in table.held_where(|o| o == owner) {
        if !now_held.contains(&(channel.clone(), socket)) {
            if let Some(change) = table.leave(&channel, socket) {
                changes.push((channel, change));
            }
        }
    }
    for (channel, socket, user_id, user_info) in sockets {
        let member = Member { user_id, user_info };
        if let Ok(Some(change)) = table.join(&channel, socket, owner, member) {
            changes.push((channel, change));
        }
    }
    changes
}

fn encode(wire: &Wire) -> Vec<u8> {
    serde_json::to_vec(wire).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn member(id: &str) -> Member {
        Member::parse(&format!(r#"{{"user_id":"{id}"}}"#)).unwrap()
    }

    /// Two nodes, each with its table; `a`'s messages applied to `b`.
    #[test]
    fn joins_and_leaves_replicate_and_own_messages_are_skipped() {
        let now = Instant::now();
        let (mut a, mut b) = (ClusterPresence::new("a"), ClusterPresence::new("b"));
        let (mut ta, mut tb) = (Presence::default(), Presence::default());
        ta.join("presence-r", (1, 1), 0, member("u1")).unwrap();
        let join = a.join("presence-r", (1, 1), &member("u1"));
        assert_eq!(a.apply(&mut ta, &join, now).unwrap(), Applied::default());
        let applied = b.apply(&mut tb, &join, now).unwrap();
        assert!(matches!(applied.changes[..], [(_, Change::Added(_))]));
        assert_eq!(tb.user_count("presence-r"), 1);
        // The same user on b's own socket: no event; a's socket leaves: still there.
        tb.join("presence-r", (2, 1), 0, member("u1")).unwrap();
        let leave = a.leave("presence-r", (1, 1));
        assert!(b.apply(&mut tb, &leave, now).unwrap().changes.is_empty());
        assert_eq!(tb.user_count("presence-r"), 1);
    }

    #[test]
    fn a_state_replaces_what_a_node_held_with_events_only_for_the_difference() {
        let now = Instant::now();
        let (a, mut b) = (ClusterPresence::new("a"), ClusterPresence::new("b"));
        let (mut ta, mut tb) = (Presence::default(), Presence::default());
        for (slot, user) in [(1, "u1"), (2, "u2")] {
            ta.join("presence-r", (1, slot), 0, member(user)).unwrap();
            let join = a.join("presence-r", (1, slot), &member(user));
            b.apply(&mut tb, &join, now).unwrap();
        }
        // While b did not hear: u2 left, u3 came. a's state brings b up to date.
        ta.leave("presence-r", (1, 2));
        ta.join("presence-r", (1, 3), 0, member("u3")).unwrap();
        let mut changes = Vec::new();
        let mut wanted = false;
        for message in a.state(&ta, &[], true) {
            let applied = b.apply(&mut tb, &message, now).unwrap();
            changes.extend(applied.changes);
            wanted |= applied.state_wanted;
        }
        assert!(wanted);
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(
            tb.user_ids("presence-r"),
            vec![Value::from("u1"), Value::from("u3")]
        );
    }

    #[test]
    fn a_big_state_arrives_in_parts() {
        let now = Instant::now();
        let (a, mut b) = (ClusterPresence::new("a"), ClusterPresence::new("b"));
        let (mut ta, mut tb) = (Presence::default(), Presence::default());
        let n = STATE_CHUNK + 5;
        for i in 0..n {
            let channel = format!("presence-{}", i % 7);
            ta.join(&channel, (1, i as u32), 0, member(&i.to_string()))
                .unwrap();
        }
        let messages = a.state(&ta, &[], false);
        assert_eq!(messages.len(), 2);
        for message in messages {
            b.apply(&mut tb, &message, now).unwrap();
        }
        assert_eq!(tb.socket_count(), n);
    }

    #[test]
    fn a_silent_node_leaves_with_its_members() {
        let start = Instant::now();
        let (a, mut b) = (ClusterPresence::new("a"), ClusterPresence::new("b"));
        let mut tb = Presence::default();
        let join = a.join("presence-r", (1, 1), &member("u1"));
        b.apply(&mut tb, &join, start).unwrap();
        let reported = |_: &str| Some(start + Duration::from_secs(2));
        let early = b.expire(&mut tb, reported, start + Duration::from_secs(5));
        assert_eq!(early, Expired::default());
        let later = start + Duration::from_secs(6);
        let expired = b.expire(&mut tb, reported, later);
        assert!(matches!(expired.changes[..], [(_, Change::Removed(_))]));
        assert_eq!(tb.socket_count(), 0);
    }

    #[test]
    fn occupancy_follows_messages_states_and_silence() {
        let start = Instant::now();
        let (a, mut b) = (ClusterPresence::new("a"), ClusterPresence::new("b"));
        let mut tb = Presence::default();
        b.apply(&mut tb, &a.occupancy("news", true), start).unwrap();
        assert!(b.others_occupy("news"));
        b.apply(&mut tb, &a.occupancy("news", false), start)
            .unwrap();
        assert!(!b.others_occupy("news"));
        // A state replaces what a node held.
        b.apply(&mut tb, &a.occupancy("old", true), start).unwrap();
        for part in a.state(&Presence::default(), &["news".into()], false) {
            b.apply(&mut tb, &part, start).unwrap();
        }
        assert!(b.others_occupy("news") && !b.others_occupy("old"));
        // Silence: the channel is vacated as far as b knows.
        let expired = b.expire(&mut tb, |_| None, start + Duration::from_secs(10));
        assert_eq!(expired.vacated, vec!["news".to_string()]);
    }

    #[test]
    fn garbage_is_an_error() {
        let mut b = ClusterPresence::new("b");
        let mut tb = Presence::default();
        for bad in [&b""[..], b"{}", br#"{"op":"join","node":"a"}"#, b"\xff"] {
            assert!(b.apply(&mut tb, bad, Instant::now()).is_err());
        }
    }

    proptest::proptest! {
        /// Anyone who can publish on the broker can send anything: an error, never a
        /// panic, and the table stays usable.
        #[test]
        fn any_bytes_are_applied_or_refused(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200)) {
            let mut b = ClusterPresence::new("b");
            let mut tb = Presence::default();
            let _ = b.apply(&mut tb, &bytes, Instant::now());
            let _ = tb.subscription_data("presence-r");
        }
    }
}
