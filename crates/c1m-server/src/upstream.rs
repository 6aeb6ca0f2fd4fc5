//! Where a process's publications come from and where its waiting requests go: the
//! one thing that differs between a single process, a worker, and a single process in
//! a cluster. One enum instead of a pair of `Option`s, so every place that cares
//! matches on the three roles by name.
//!
//! - [`Upstream::Local`]: `c1m serve --workers 1` without `--broker`. Publications
//!   are delivered here and answered at once.
//! - [`Upstream::ViaMaster`]: a worker of a multi-process server. The master keeps the
//!   clock, relays publishes to every worker and sums their counts, holds the cluster
//!   link, and answers `GET /stats` for the node; requests that wait for it are parked
//!   here ([`MasterLink`]) and answered within [`MASTER_ANSWER_WAIT`].
//! - [`Upstream::ViaBroker`]: a single process with `--broker`: the cluster link
//!   itself ([`ClusterNode`]).

use std::collections::HashMap;
use std::io::{self, Read};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::UnixStream;

use crate::cluster::ClusterNode;
use crate::connection::Connection;
use crate::control::{write_queued, Message};
use crate::publish_acks::ACK_WAIT;
use crate::scoreboard::Scoreboard;
use crate::target::Target;

/// Longest a worker waits for its master's answer to a request (a relayed publish,
/// `GET /stats`, a publish through the cluster) before answering its client with 504.
/// The master answers first in every case but its own stall: it bounds a relay by
/// `master::RELAY_WAIT` and a cluster publish by `publish_acks::ACK_WAIT`.
pub const MASTER_ANSWER_WAIT: Duration = Duration::from_secs(ACK_WAIT.as_secs() + 1);

pub enum Upstream {
    Local,
    ViaMaster(MasterLink),
    ViaBroker(ClusterNode<Waiting>),
}

impl Upstream {
    /// `None` without a cluster; with one, whether its broker link is up.
    pub fn cluster_up(&self) -> Option<bool> {
        match self {
            Upstream::Local => None,
            Upstream::ViaMaster(link) => link.cluster_up,
            Upstream::ViaBroker(cluster) => Some(cluster.is_up()),
        }
    }

    /// This process has (or no longer has) subscribers of `topic`: the cluster
    /// subscribes to a topic only while some process of the node has them.
    pub fn interest(&mut self, topic: &str, on: bool) {
        match self {
            Upstream::Local => {}
            Upstream::ViaMaster(link) => {
                if link.cluster_up.is_some() || link.share_interest {
                    link.send(&Message::Interest {
                        topic: topic.to_string(),
                        on,
                    });
                }
            }
            Upstream::ViaBroker(cluster) => cluster.interest(0, topic, on),
        }
    }

    /// The earliest time this upstream has timed work (expiries, reports).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Upstream::Local => None,
            Upstream::ViaMaster(link) => Some(link.next_deadline()),
            Upstream::ViaBroker(cluster) => Some(cluster.next_deadline()),
        }
    }
}

/// An HTTP request whose answer waits for another process (the master or the
/// cluster).
#[derive(Debug)]
pub struct Waiting {
    pub key: usize,
    /// The connection's deadline, which identifies it if its slab key was reused.
    pub deadline: Option<Instant>,
    pub started: Instant,
    /// What it waits for.
    pub request: WaitingFor,
    /// Whether the client asked to keep the connection for another request.
    pub keep_alive: bool,
}

#[derive(Debug)]
pub enum WaitingFor {
    /// A publish to `Target`; the position its topic's history gave it, if any.
    Publish(Target, Option<crate::history::Position>),
    Stats,
}

impl Waiting {
    /// A publish nobody waits for (a Pusher API event is answered at once): its
    /// answer finds no connection and is dropped.
    pub fn nobody(started: Instant) -> Waiting {
        Waiting {
            key: usize::MAX,
            deadline: None,
            started,
            request: WaitingFor::Stats,
            keep_alive: false,
        }
    }

    pub fn new(
        conn: &Connection,
        key: usize,
        keep_alive: bool,
        request: WaitingFor,
        started: Instant,
    ) -> Waiting {
        Waiting {
            key,
            deadline: conn.deadline(),
            started,
            request,
            keep_alive,
        }
    }
}

/// A worker's end of its control channel to the master.
pub struct MasterLink {
    pub index: usize,
    /// Counters shared with the master and the other workers.
    pub scoreboard: Arc<Scoreboard>,
    control: UnixStream,
    /// Bytes read from `control` not yet forming a complete message.
    incoming: Vec<u8>,
    /// Messages for the master not yet written.
    outgoing: Vec<u8>,
    next_request: u32,
    /// Requests handed to the master, waiting for its answer, with their deadline.
    waiting: HashMap<u32, (Waiting, Instant)>,
    /// `None` without `--broker`; else the broker link's state, as the master reports it.
    pub cluster_up: Option<bool>,
    /// The master's largest history topics as (name, bytes), as of its last second
    /// (`control::Message::HistoryLargest`).
    pub history_largest: Vec<(String, usize)>,
    /// Tell the master about topics that got their first or lost their last
    /// subscriber even without a cluster (Pusher webhooks: the master decides
    /// `channel_occupied`/`vacated` for the node).
    pub share_interest: bool,
    /// The node's webhook counters, as of the master's last second.
    pub webhook_counts: Option<crate::webhooks::WebhookCounts>,
    /// When this worker next sends its topic counts.
    next_report: Instant,
}

impl MasterLink {
    pub fn new(
        index: usize,
        scoreboard: Arc<Scoreboard>,
        control: UnixStream,
        cluster: bool,
    ) -> MasterLink {
        MasterLink {
            index,
            scoreboard,
            control,
            incoming: Vec::new(),
            outgoing: Vec::new(),
            next_request: 0,
            waiting: HashMap::new(),
            cluster_up: cluster.then_some(false),
            history_largest: Vec::new(),
            share_interest: false,
            webhook_counts: None,
            next_report: Instant::now(),
        }
    }

    pub fn control_mut(&mut self) -> &mut UnixStream {
        &mut self.control
    }

    /// Queues a message for the master (written by [`MasterLink::io`]).
    pub fn send(&mut self, message: &Message) {
        message.encode(&mut self.outgoing);
    }

    pub fn has_output(&self) -> bool {
        !self.outgoing.is_empty()
    }

    /// Parks `waiting` under a new request number, answered by the master's `Done` or
    /// `Answer` or, failing those, by [`MasterLink::expire`].
    pub fn park(&mut self, waiting: Waiting, now: Instant) -> u32 {
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.waiting
            .insert(request, (waiting, now + MASTER_ANSWER_WAIT));
        request
    }

    /// The parked request the master answered.
    pub fn unpark(&mut self, request: u32) -> Option<Waiting> {
        self.waiting.remove(&request).map(|(waiting, _)| waiting)
    }

    /// Requests the master did not answer within [`MASTER_ANSWER_WAIT`]: forgotten
    /// here (a late answer is ignored) and returned to be answered with 504.
    pub fn expire(&mut self, now: Instant) -> Vec<Waiting> {
        let late: Vec<u32> = self
            .waiting
            .iter()
            .filter(|(_, (_, deadline))| now >= *deadline)
            .map(|(&request, _)| request)
            .collect();
        late.into_iter().filter_map(|r| self.unpark(r)).collect()
    }

    /// Requests waiting for the master now.
    pub fn parked(&self) -> usize {
        self.waiting.len()
    }

    /// Whether the topic counts are due (every `node_stats::REPORT_EVERY`).
    pub fn report_due(&mut self, now: Instant) -> bool {
        if now < self.next_report {
            return false;
        }
        self.next_report = now + crate::node_stats::REPORT_EVERY;
        true
    }

    fn next_deadline(&self) -> Instant {
        let parked = self.waiting.values().map(|(_, deadline)| *deadline).min();
        parked.map_or(self.next_report, |at| at.min(self.next_report))
    }

    /// Writes what the channel takes, then reads every complete message the master
    /// sent. An error (the master is gone) means this worker must shut down.
    pub fn io(&mut self) -> io::Result<Vec<Message>> {
        write_queued(&mut self.control, &mut self.outgoing)?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match self.control.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => self.incoming.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Message::decode_all(&mut self.incoming)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Writes queued messages (after handling the master's, which may queue answers).
    pub fn flush(&mut self) -> io::Result<()> {
        write_queued(&mut self.control, &mut self.outgoing)
    }
}
