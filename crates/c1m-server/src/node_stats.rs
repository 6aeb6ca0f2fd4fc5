//! The numbers behind `GET /stats`: this node's connections and subscribers per topic,
//! and (`?scope=cluster`) the same summed over every node of the cluster.
//!
//! Why reports over the broker rather than asking the nodes at query time: nodes know
//! nothing of each other except the broker they share, and NATS core and Redis pub/sub
//! have no common request/reply with "everyone answered". So every node publishes a
//! small [`NodeReport`] every [`REPORT_EVERY`] on one subject, every node keeps the
//! latest report of each node in a [`ClusterView`], and the cluster answer is their
//! sum. A node that stops reporting (dead, partitioned) drops out after
//! [`STALE_AFTER`]. The cost is one message per node per second, whatever the number
//! of connections; the price is that cluster numbers are up to [`REPORT_EVERY`] old.
//!
//! A report names at most [`MAX_REPORTED_TOPICS`] topics (the largest), to stay far
//! below the brokers' message limits (NATS: 1 MiB by default); a report that left some
//! out says `topics_truncated`, and so does every sum it went into.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::target::Target;

/// How often a node publishes its report (and a worker sends its topic counts up).
pub const REPORT_EVERY: Duration = Duration::from_secs(1);

/// A node whose last report is older than this is left out of the cluster numbers.
pub const STALE_AFTER: Duration = Duration::from_millis(3500);

/// Most topics one report names; the largest ones are kept.
pub const MAX_REPORTED_TOPICS: usize = 1000;

/// Largest report accepted from the broker (a report of `MAX_REPORTED_TOPICS` names
/// of the longest allowed name is ~160 KB).
const MAX_REPORT_BYTES: usize = 512 * 1024;

/// This node's name in reports: `HOST:PORT/PID` (the PID of the master in a
/// multi-process server), unique among nodes on one machine too.
pub fn node_id(listen: SocketAddr) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| listen.ip().to_string());
    format!("{host}:{}/{}", listen.port(), std::process::id())
}

/// Subscribers per topic, the `MAX_REPORTED_TOPICS` largest, and whether some were
/// left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopicCounts {
    pub topics: BTreeMap<String, u64>,
    #[serde(default)]
    pub topics_truncated: bool,
}

impl TopicCounts {
    /// Keeps the `MAX_REPORTED_TOPICS` topics with most subscribers. Runs every second
    /// over every topic of a worker, so it keeps only a bounded heap of the largest
    /// (no copy of a million-topic list).
    pub fn largest<'a>(all: impl IntoIterator<Item = (&'a str, u64)>) -> TopicCounts {
        let mut heap: BinaryHeap<Reverse<(u64, &str)>> =
            BinaryHeap::with_capacity(MAX_REPORTED_TOPICS + 1);
        let mut topics_truncated = false;
        for (topic, n) in all {
            heap.push(Reverse((n, topic)));
            if heap.len() > MAX_REPORTED_TOPICS {
                heap.pop(); // the smallest so far
                topics_truncated = true;
            }
        }
        TopicCounts {
            topics: heap
                .into_iter()
                .map(|Reverse((n, t))| (t.to_string(), n))
                .collect(),
            topics_truncated,
        }
    }

    /// Keeps the `MAX_REPORTED_TOPICS` largest (after summing several parts).
    pub fn cap(self) -> TopicCounts {
        let truncated = self.topics_truncated;
        let mut capped = TopicCounts::largest(self.topics.iter().map(|(t, n)| (t.as_str(), *n)));
        capped.topics_truncated |= truncated;
        capped
    }

    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &TopicCounts) {
        for (topic, n) in &other.topics {
            *self.topics.entry(topic.clone()).or_default() += n;
        }
        self.topics_truncated |= other.topics_truncated;
    }

    /// Subscriptions in all (a connection in two topics counts twice).
    pub fn subscriptions(&self) -> u64 {
        self.topics.values().sum()
    }
}

/// One node's numbers, as published on the broker and answered by `GET /stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// Open WebSocket connections.
    pub connections: u64,
    /// Live worker processes (1 for a single-process server).
    pub workers: u64,
    /// WebSocket messages sent since start.
    #[serde(default)]
    pub messages_out: u64,
    /// The last fan-out's duration (the slowest worker's), in µs.
    #[serde(default)]
    pub last_fanout_us: u64,
    /// Resident memory of every process of the node, in bytes.
    #[serde(default)]
    pub rss_bytes: u64,
    /// Open Pusher connections per app id (apps with none left out): the other nodes
    /// add theirs to hold each app's `max_connections` over the cluster.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pusher_apps: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub counts: TopicCounts,
}

impl NodeReport {
    /// The body of `GET /stats` (scope `node`).
    pub fn to_json(&self) -> Value {
        json!({
            "scope": "node",
            "node": self.node,
            "connections": self.connections,
            "workers": self.workers,
            "messages_out": self.messages_out,
            "last_fanout_ms": self.last_fanout_us as f64 / 1000.0,
            "rss_bytes": self.rss_bytes,
            "subscriptions": self.counts.subscriptions(),
            "topics": self.counts.topics,
            "topics_truncated": self.counts.topics_truncated,
        })
    }
}

/// The latest report of every node heard from, for `GET /stats?scope=cluster`.
#[derive(Debug, Default)]
pub struct ClusterView {
    reports: HashMap<String, (NodeReport, Instant)>,
}

impl ClusterView {
    /// Takes a report that came over the broker. Bad ones are an error (logged by the
    /// caller), never a panic: anyone who can publish on the broker can send one.
    pub fn record(&mut self, bytes: &[u8], now: Instant) -> Result<(), String> {
        if bytes.len() > MAX_REPORT_BYTES {
            return Err(format!("node report of {} bytes is too large", bytes.len()));
        }
        let report: NodeReport =
            serde_json::from_slice(bytes).map_err(|e| format!("bad node report: {e}"))?;
        if report.node.is_empty() {
            return Err("node report without a node name".into());
        }
        self.reports.insert(report.node.clone(), (report, now));
        Ok(())
    }

    /// Subscribers per topic on the other nodes heard from within `STALE_AFTER` (each
    /// report lists a node's `MAX_REPORTED_TOPICS` largest topics).
    pub fn others_counts(&self, local: &str, now: Instant) -> TopicCounts {
        let mut counts = TopicCounts::default();
        for (node, (report, at)) in &self.reports {
            if node != local && now.saturating_duration_since(*at) <= STALE_AFTER {
                counts.add(&report.counts);
            }
        }
        counts
    }

    /// Open Pusher connections of app `app_id` on the other nodes heard from within
    /// `STALE_AFTER`.
    pub fn others_app_connections(&self, local: &str, app_id: &str, now: Instant) -> u64 {
        self.reports
            .iter()
            .filter(|(node, (_, at))| {
                node.as_str() != local && now.saturating_duration_since(*at) <= STALE_AFTER
            })
            .filter_map(|(_, (report, _))| report.pusher_apps.get(app_id))
            .sum()
    }

    /// The nodes heard from within `STALE_AFTER` (this one's own report included).
    pub fn fresh_nodes(&self, now: Instant) -> impl Iterator<Item = &str> {
        self.reports
            .iter()
            .filter(move |(_, (_, at))| now.saturating_duration_since(*at) <= STALE_AFTER)
            .map(|(node, _)| node.as_str())
    }

    /// When `node`'s latest report came, if one did.
    pub fn reported_at(&self, node: &str) -> Option<Instant> {
        self.reports.get(node).map(|(_, at)| *at)
    }

    /// The nodes that should deliver a publication to `target` (every node, for
    /// [`Target::All`]): those heard from within `STALE_AFTER` whose last report has subscribers of
    /// it, and this node (`local`) if `local_has` says it has some.
    pub fn nodes_with(
        &self,
        target: &Target,
        local: &str,
        local_has: bool,
        now: Instant,
    ) -> HashSet<String> {
        let everyone = *target == Target::All;
        let topic = target.to_wire();
        let mut nodes: HashSet<String> = self
            .reports
            .iter()
            .filter(|(node, (report, at))| {
                node.as_str() != local
                    && now.saturating_duration_since(*at) <= STALE_AFTER
                    && (everyone || report.counts.topics.get(topic).is_some_and(|&n| n > 0))
            })
            .map(|(node, _)| node.clone())
            .collect();
        if everyone || local_has {
            nodes.insert(local.to_string());
        }
        nodes
    }

    /// The cluster's numbers: `local` (this node, fresh) plus the latest report of every
    /// other node heard from within `STALE_AFTER`. Forgets stale nodes.
    pub fn to_json(&mut self, local: &NodeReport, now: Instant) -> Value {
        self.reports
            .retain(|_, (_, at)| now.saturating_duration_since(*at) <= STALE_AFTER);
        let mut others: Vec<&(NodeReport, Instant)> = self
            .reports
            .values()
            .filter(|(r, _)| r.node != local.node)
            .collect();
        others.sort_by(|a, b| a.0.node.cmp(&b.0.node));
        let mut counts = local.counts.clone();
        let mut connections = local.connections;
        let mut workers = local.workers;
        let mut messages_out = local.messages_out;
        let mut last_fanout_us = local.last_fanout_us;
        let mut rss_bytes = local.rss_bytes;
        let mut nodes = vec![json!({
            "node": local.node,
            "connections": local.connections,
            "workers": local.workers,
            "report_age_ms": 0,
        })];
        for (report, at) in others {
            counts.add(&report.counts);
            connections += report.connections;
            workers += report.workers;
            messages_out += report.messages_out;
            last_fanout_us = last_fanout_us.max(report.last_fanout_us);
            rss_bytes += report.rss_bytes;
            nodes.push(json!({
                "node": report.node,
                "connections": report.connections,
                "workers": report.workers,
                "report_age_ms": now.saturating_duration_since(*at).as_millis() as u64,
            }));
        }
        json!({
            "scope": "cluster",
            "nodes": nodes.len(),
            "connections": connections,
            "workers": workers,
            "messages_out": messages_out,
            "last_fanout_ms": last_fanout_us as f64 / 1000.0,
            "rss_bytes": rss_bytes,
            "subscriptions": counts.subscriptions(),
            "topics": counts.topics,
            "topics_truncated": counts.topics_truncated,
            "per_node": nodes,
        })
    }
}

/// The status and JSON body of `GET /stats`: `local` alone, or (`cluster`) the sum
/// over the cluster. `view` is `None` without `--broker` (the cluster is this node
/// alone) and the view with the link's state otherwise.
pub fn answer(
    local: &NodeReport,
    cluster: bool,
    view: Option<(&mut ClusterView, bool)>,
    now: Instant,
) -> (u16, Value) {
    if !cluster {
        return (200, local.to_json());
    }
    match view {
        None => (200, ClusterView::default().to_json(local, now)),
        Some((_, false)) => (
            503,
            json!({"error": "the cluster broker is down: cluster numbers are unknown until it is back"}),
        ),
        Some((view, true)) => (200, view.to_json(local, now)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(node: &str, connections: u64, topics: &[(&str, u64)]) -> NodeReport {
        NodeReport {
            node: node.into(),
            connections,
            workers: 1,
            messages_out: connections * 10,
            last_fanout_us: connections * 100,
            rss_bytes: 1 << 20,
            pusher_apps: BTreeMap::from([("app".to_string(), connections)]),
            counts: TopicCounts::largest(topics.iter().copied()),
        }
    }

    #[test]
    fn cluster_sums_fresh_nodes_and_forgets_stale_ones() {
        let start = Instant::now();
        let mut view = ClusterView::default();
        let b = report("b", 5, &[("time", 5), ("x", 2)]);
        let c = report("c", 7, &[("time", 7)]);
        for r in [&b, &c] {
            let bytes = serde_json::to_vec(r).unwrap();
            view.record(&bytes, start).unwrap();
        }
        // Our own report comes back from the broker too: the local one wins.
        let a_old = report("a", 1, &[]);
        view.record(&serde_json::to_vec(&a_old).unwrap(), start)
            .unwrap();
        let a = report("a", 3, &[("time", 3), ("y", 1)]);
        let all = view.to_json(&a, start + Duration::from_millis(10));
        assert_eq!(view.others_app_connections("a", "app", start), 5 + 7);
        assert_eq!(all["nodes"], 3);
        assert_eq!(all["connections"], 15);
        assert_eq!(all["topics"]["time"], 15);
        assert_eq!(all["topics"]["x"], 2);
        assert_eq!(all["topics"]["y"], 1);
        assert_eq!(all["subscriptions"], 18);
        assert_eq!(all["messages_out"], 150);
        assert_eq!(all["last_fanout_ms"], 0.7, "the slowest node's");
        assert_eq!(all["rss_bytes"], 3 << 20);
        assert_eq!(all["per_node"][0]["node"], "a");
        assert_eq!(all["per_node"][1]["report_age_ms"], 10);
        // c keeps reporting, b went silent.
        let later = start + STALE_AFTER + Duration::from_millis(1);
        view.record(&serde_json::to_vec(&c).unwrap(), later)
            .unwrap();
        let expect = |topic: &str, has| {
            let mut v: Vec<String> = view
                .nodes_with(&Target::from_wire(topic.into()), "a", has, later)
                .into_iter()
                .collect();
            v.sort();
            v
        };
        assert_eq!(expect("time", false), ["c"]);
        assert_eq!(expect("x", false), Vec::<String>::new(), "b went silent");
        assert_eq!(expect("y", true), ["a"]);
        assert_eq!(expect("", false), ["a", "c"], "every node");
        let all = view.to_json(&a, later);
        assert_eq!(all["nodes"], 2);
        assert_eq!(all["connections"], 10);
        // Pusher connections per app: the other fresh nodes' (c's 7; b is stale).
        assert_eq!(view.others_app_connections("a", "app", later), 7);
        assert_eq!(view.others_app_connections("a", "other", later), 0);
    }

    #[test]
    fn bad_reports_are_errors() {
        let mut view = ClusterView::default();
        let now = Instant::now();
        for bad in [
            &b"not json"[..],
            br#"{"node":"","connections":1,"workers":1,"topics":{}}"#,
            br#"{"node":"n","connections":-1,"workers":1,"topics":{}}"#,
            br#"{"node":"n","connections":1,"workers":1,"topics":{"a":"x"}}"#,
        ] {
            assert!(view.record(bad, now).is_err());
        }
        assert!(view.record(&vec![b' '; MAX_REPORT_BYTES + 1], now).is_err());
    }

    proptest::proptest! {
        // Node reports come from the broker: any bytes are recorded or refused, never a
        // panic.
        #[test]
        fn any_report_bytes_are_safe(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut view = ClusterView::default();
            let _ = view.record(&bytes, Instant::now());
            let local = report("me", 1, &[("a", 1)]);
            let _ = view.to_json(&local, Instant::now());
        }
    }

    #[test]
    fn only_the_largest_topics_are_reported() {
        let names: Vec<String> = (0..MAX_REPORTED_TOPICS + 5)
            .map(|i| format!("t{i}"))
            .collect();
        let counts = TopicCounts::largest(
            names
                .iter()
                .enumerate()
                .map(|(i, n)| (n.as_str(), i as u64)),
        );
        assert!(counts.topics_truncated);
        assert_eq!(counts.topics.len(), MAX_REPORTED_TOPICS);
        assert!(
            !counts.topics.contains_key("t0"),
            "the smallest are dropped"
        );
        assert!(counts
            .topics
            .contains_key(&format!("t{}", MAX_REPORTED_TOPICS + 4)));
        let mut sum = TopicCounts::largest([("a", 1)]);
        sum.add(&counts);
        assert!(sum.topics_truncated);
    }
}
