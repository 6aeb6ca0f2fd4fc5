//! The master of a multi-process server (`c1m serve --workers N`).
//!
//! Why processes: where the per-process open-file limit is capped (20,000 here), a
//! million connections need ~51 processes. The master:
//! - binds the listening socket once; every worker inherits it and accepts from it
//!   while it has room (see `Server::set_accepting`), so a full worker is never handed
//!   a connection it cannot take;
//! - keeps the clock: it stamps each broadcast once, encodes the frame once, and sends
//!   it to every worker over a Unix socket (see `control`);
//! - relays publishes: a worker that takes `POST /publish` sends the encoded frame up,
//!   the master sends it to every worker and sums their delivery counts for the answer
//!   (`relays`: within `RELAY_WAIT`, partial if a worker did not count in time);
//! - reads every worker's counters from the shared [`Scoreboard`] for the `--total`
//!   gate and one stats line for the whole server;
//! - answers `GET /stats` for the whole node (workers send their topic counts up
//!   every second; a worker that takes the request asks the master) and, with a
//!   broker, publishes the node's report and keeps the other nodes' (`node_stats`);
//! - respawns a worker that dies (its clients reconnect to the others; the other
//!   workers' clients are untouched);
//! - passes SIGHUP on to every worker (to reload the TLS certificate);
//! - on SIGINT/SIGTERM passes SIGTERM to every worker (each closes its clients with
//!   1001), waits for them up to `close_timeout` + 2 s, then SIGKILLs what is left.

mod presence;
mod relays;
mod workers;

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::process::Child;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::SystemTime;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::broker::Stored;
use crate::clock::Clock;
use crate::cluster::{ClusterEvent, ClusterNode};
use crate::cluster_copy::{ClusterCopy, HistoryReads};
use crate::config::ServeConfig;
use crate::control::{Message, Origin};
use crate::history::{History, NotRecovered, Position, Recovery};
use crate::listener::listen_socket;
use crate::node_stats::{self, NodeReport, TopicCounts};
use crate::publish_acks::Finished;
use crate::scoreboard::Scoreboard;
use crate::server::ServeError;
use crate::target::{Delivery, Target};
use crate::tickets::{period_at, SharedTicketer, TicketKey};

pub use relays::RELAY_WAIT;
use relays::{Counted, Relays};
pub use workers::WorkerFds;
use workers::WorkerProcess;

const SIGNALS: Token = Token(usize::MAX - 1);
const BROKER: Token = Token(usize::MAX - 2);

/// Runs the master. `spawn` starts worker process `fds.index` so that it inherits the
/// three descriptors in `fds` (the binary knows how to re-execute itself).
pub fn run_master<S: Fn(WorkerFds) -> io::Result<Child>>(
    config: ServeConfig,
    workers: usize,
    spawn: S,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    // Check what workers would otherwise each fail on, once, with a clear error.
    if let Some(files) = &config.tls {
        let ticketer = Arc::new(SharedTicketer::new(TicketKey::fresh()));
        crate::tls::load(files, &ticketer)?;
    }
    crate::auth::Gate::new(
        config.allowed_origins.clone(),
        config.jwt.as_ref(),
        config.max_topics_per_connection,
    )?;
    let mut master = Master::start(config, workers, spawn)?;
    tracing::info!(addr = %master.local_addr, workers, "listening");
    on_listening(master.local_addr);
    master.run()
}

/// A publish through the cluster answered to worker `.0`'s request `.1`.
type WorkerRequest = (u32, u32);

struct Master<S> {
    config: ServeConfig,
    spawn: S,
    /// Inherited by every worker; the master never accepts from it.
    listener: TcpListener,
    local_addr: SocketAddr,
    poll: Poll,
    signals: Signals,
    scoreboard: Scoreboard,
    workers: Vec<WorkerProcess>,
    clock: Clock,
    relays: Relays,
    /// The next id of a publication from the broker relayed to the workers.
    next_relay: u32,
    /// With `--broker`: the node's one cluster link, for all its workers.
    cluster: Option<ClusterNode<WorkerRequest>>,
    /// Each worker's latest topic counts (empty until it sends, and after it dies).
    worker_counts: Vec<TopicCounts>,
    /// Topic history of the node (`--history-*`): without `--broker` the master orders
    /// the node's publications, so it gives the offsets and answers recoveries; with
    /// one, the broker gives them and this is the node's copy.
    history: Option<History>,
    /// Positions of worker publishes still being counted, for their answers.
    positions: HashMap<(u32, u32), Position>,
    /// In a cluster with history: the node's copy of the broker's history (in
    /// `history`) and the workers' resumes waiting for the broker (`cluster_copy`).
    copy: ClusterCopy<(usize, u32)>,
    /// In a cluster with history: the workers' `GET /history` requests waiting for the
    /// broker, which keeps the cluster's history.
    history_reads: HistoryReads<(usize, u32)>,
    next_history_expiry: Instant,
    next_webhook_counts: Instant,
    /// Presence members of the node's Pusher sockets, each owned by its worker
    /// (`master/presence.rs`).
    presence: crate::presence::Presence,
    /// The node's Pusher webhooks (`--pusher-webhook`), and which workers have
    /// subscribers of each channel (for `channel_occupied`/`vacated`).
    webhooks: crate::webhooks::AppWebhooks,
    occupied: HashMap<String, std::collections::HashSet<usize>>,
    node: String,
    /// The node's TLS session-ticket key, stepped each period and shared with the
    /// workers through the scoreboard (see `tickets`).
    ticket_key: TicketKey,
    next_stats: Instant,
    /// (when, messages out) at the previous stats line, for its rate.
    last_frames: (Instant, u64),
    shutdown_deadline: Option<Instant>,
}

/// Whether the master's loop goes on.
#[derive(PartialEq)]
enum Flow {
    Continue,
    Exit,
}

impl<S: Fn(WorkerFds) -> io::Result<Child>> Master<S> {
    fn start(config: ServeConfig, count: usize, spawn: S) -> Result<Master<S>, ServeError> {
        let addr = config.listen;
        let listen_error = |source| ServeError::Listen { addr, source };
        let listener =
            listen_socket(addr, config.backlog, config.reuse_port).map_err(listen_error)?;
        let local_addr = listener.local_addr()?;
        // Signal handlers first: a SIGTERM that arrives while workers start must still drain.
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let scoreboard = Scoreboard::create(count)?;
        // Before any worker starts: each takes the key as it does.
        let ticket_key = TicketKey::fresh();
        scoreboard.put_ticket_key(&ticket_key);
        let mut workers = Vec::with_capacity(count);
        for index in 0..count {
            let fd = listener.as_raw_fd();
            workers.push(WorkerProcess::start(
                &spawn,
                &poll,
                index,
                count,
                fd,
                &scoreboard,
            )?);
        }
        let node = node_stats::node_id(local_addr);
        let cluster = match &config.broker {
            None => None,
            Some(url) => Some(ClusterNode::start(
                url.clone(),
                node.clone(),
                config.history.enabled().then(|| config.history.clone()),
                poll.registry(),
                BROKER,
            )?),
        };
        let webhooks = crate::webhooks::AppWebhooks::for_apps(&config.pusher_apps)?;
        let mut cluster = cluster;
        if let Some(cluster) = cluster.as_mut() {
            if webhooks.any() {
                cluster.share_occupancy();
            }
        }
        let now = Instant::now();
        // Without a cluster the master orders the node's publications and keeps their
        // history; in one, its copy of what the broker keeps (`cluster_copy`).
        let history = config
            .history
            .enabled()
            .then(|| History::new(config.history.clone()));
        Ok(Master {
            clock: Clock::new(&config, now),
            ticket_key,
            next_stats: now + config.stats_interval,
            last_frames: (now, 0),
            config,
            spawn,
            listener,
            local_addr,
            poll,
            signals,
            scoreboard,
            workers,
            relays: Relays::default(),
            next_relay: 0,
            cluster,
            worker_counts: vec![TopicCounts::default(); count],
            history,
            positions: HashMap::new(),
            copy: ClusterCopy::default(),
            history_reads: HistoryReads::default(),
            next_history_expiry: now,
            next_webhook_counts: now,
            presence: Default::default(),
            webhooks,
            occupied: HashMap::new(),
            node,
            shutdown_deadline: None,
        })
    }

    fn run(&mut self) -> Result<(), ServeError> {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let wake = [
                self.clock.deadline(),
                Some(self.next_stats),
                self.shutdown_deadline,
                self.relays.next_deadline(),
                self.cluster.as_ref().map(ClusterNode::next_deadline),
                self.copy.next_deadline(),
                self.history_reads.next_deadline(),
                self.webhooks.next_deadline(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|at| {
                at.saturating_duration_since(now)
                    .min(Duration::from_millis(50))
            });
            if let Err(e) = self.poll.poll(&mut events, wake) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            let now = Instant::now();
            if self.on_signals(now) == Flow::Exit {
                return Ok(());
            }
            if self.shutdown_deadline.is_some() {
                if self.on_shutdown_tick(now) == Flow::Exit {
                    return Ok(());
                }
                continue;
            }
            for index in 0..self.workers.len() {
                for message in self.workers[index].read_messages() {
                    self.on_worker_message(index, message, now);
                }
                if self.workers[index].take_hang_up() {
                    // Its clients are reconnecting to the other workers right now; a
                    // stale count would refuse them as over --max-connections.
                    self.scoreboard.reset(index);
                }
            }
            self.on_cluster_events(now);
            self.on_tick(now);
        }
    }

    /// SIGCHLD reaps (and respawns); SIGHUP goes to every worker (each reloads its own
    /// TLS certificate); SIGINT/SIGTERM starts the shutdown, a second one ends it now.
    fn on_signals(&mut self, now: Instant) -> Flow {
        let mut reap = false;
        let signals: Vec<i32> = self.signals.pending().collect();
        for signal in signals {
            match signal {
                SIGCHLD => reap = true,
                SIGHUP => self.signal_all(libc::SIGHUP),
                _ if self.shutdown_deadline.is_some() => {
                    tracing::warn!("second signal: killing workers now");
                    self.signal_all(libc::SIGKILL);
                    return Flow::Exit;
                }
                _ => {
                    tracing::info!("shutting down: stopping every worker");
                    self.signal_all(libc::SIGTERM);
                    let grace = self.config.close_timeout + Duration::from_secs(2);
                    self.shutdown_deadline = Some(now + grace);
                }
            }
        }
        // Catch exits whose SIGCHLD merged with another, too.
        if reap || self.shutdown_deadline.is_some() {
            self.reap();
        }
        Flow::Continue
    }

    /// Collects exited workers; while serving, starts a replacement for each.
    fn reap(&mut self) {
        let respawn = self.shutdown_deadline.is_none();
        let count = self.workers.len();
        for index in 0..count {
            let Some(status) = self.workers[index].reap() else {
                continue;
            };
            self.scoreboard.reset(index);
            // A dead worker will not answer: it is done with every waiting relay.
            self.relays.worker_gone(index);
            self.worker_counts[index] = TopicCounts::default();
            self.presence_worker_gone(index, Instant::now());
            self.interest_worker_gone(index, Instant::now());
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.forget_member(index);
            }
            if !respawn {
                continue;
            }
            tracing::warn!(worker = index, %status, "worker exited; starting a new one");
            let fd = self.listener.as_raw_fd();
            match WorkerProcess::start(&self.spawn, &self.poll, index, count, fd, &self.scoreboard)
            {
                Ok(mut fresh) => {
                    fresh.restarts = self.workers[index].restarts + 1;
                    if let Some(cluster) = &self.cluster {
                        // The replacement learns the link's state.
                        fresh.send(&Message::BrokerUp {
                            up: cluster.is_up(),
                        });
                    }
                    self.workers[index] = fresh;
                }
                Err(error) => tracing::error!(worker = index, %error, "cannot restart worker"),
            }
        }
        self.finish_relays(Instant::now());
    }

    /// While shutting down: done once every worker exited, or at the deadline.
    fn on_shutdown_tick(&mut self, now: Instant) -> Flow {
        if self.workers.iter().all(|w| !w.is_alive()) {
            tracing::info!("shutdown complete");
            return Flow::Exit;
        }
        if self
            .shutdown_deadline
            .is_some_and(|deadline| now >= deadline)
        {
            tracing::warn!("workers did not stop in time: killing them");
            self.signal_all(libc::SIGKILL);
            for worker in &mut self.workers {
                if let Some(mut child) = worker.child.take() {
                    let _ = child.wait();
                }
            }
            return Flow::Exit;
        }
        Flow::Continue
    }

    fn on_worker_message(&mut self, index: usize, message: Message, now: Instant) {
        match message {
            Message::Relay {
                request,
                target,
                exclude,
                frame,
            } => self.on_relay(index, request, (target, exclude), frame, now),
            Message::Interest { topic, on } => {
                if let Some(cluster) = self.cluster.as_mut() {
                    cluster.interest(index, &topic, on);
                }
                self.stop_listening_unless_subscribed(&topic);
                self.worker_interest(index, &topic, on, now);
            }
            Message::Terminate { topic } => {
                if let Some(cluster) = &self.cluster {
                    cluster.terminate_user(&topic);
                }
                self.terminate_on_workers(&topic);
            }
            Message::Webhook { app, json } => match serde_json::from_slice(&json) {
                Ok(event) => self.webhooks.push(app as usize, event, now),
                Err(error) => tracing::warn!(%error, "bad webhook event from a worker"),
            },
            Message::Delivered { origin, count } => self.relays.counted(origin, index, count),
            Message::HistoryRequest { request, query } => {
                let (status, body) = match crate::http::parse_history_query(&query) {
                    Ok(query) if self.history.is_some() && self.cluster.is_some() => {
                        // A cluster's positions are the broker's: read its history.
                        let asked = self.cluster.as_mut().and_then(|cluster| {
                            cluster.read_history(&query.topic, query.since, query.limit)
                        });
                        match asked {
                            Some(id) => {
                                return self.history_reads.wait(id, (index, request), query, now)
                            }
                            None => crate::http::history_answer_from_broker(&query, None),
                        }
                    }
                    Ok(query) => crate::http::history_answer(self.history.as_mut(), &query, now),
                    Err(error) => (400, serde_json::json!({ "error": error })),
                };
                self.answer_worker(index, request, status, &body);
            }
            Message::Recover {
                request,
                topic,
                offset,
                epoch,
            } => {
                if self.resumes_via_broker(&topic, offset, &epoch, now) {
                    return self.ask_broker_to_recover(index, request, &topic, offset, epoch, now);
                }
                // Answered on the same channel after every publication it covers.
                let answer = match self.history.as_mut() {
                    None => Message::Recovered {
                        request,
                        outcome: Err(NotRecovered::NoHistory),
                        position: None,
                    },
                    Some(history) => match history.recover(&topic, &epoch, offset, now) {
                        Recovery::Recovered {
                            publications,
                            position,
                        } => Message::Recovered {
                            request,
                            outcome: Ok(publications
                                .into_iter()
                                .map(|(offset, frame)| (offset, frame.to_vec()))
                                .collect()),
                            position: Some(position),
                        },
                        Recovery::NotRecovered { reason, position } => Message::Recovered {
                            request,
                            outcome: Err(reason),
                            position,
                        },
                    },
                };
                self.workers[index].send(&answer);
            }
            Message::TopicCounts { json } => match serde_json::from_slice(&json) {
                Ok(counts) => self.worker_counts[index] = counts,
                Err(error) => tracing::warn!(%error, "bad topic counts from a worker"),
            },
            Message::StatsRequest { request, cluster } => {
                let local = self.node_report();
                let (status, body) = match self.cluster.as_mut() {
                    Some(node) => node.stats(&local, cluster, now),
                    None => node_stats::answer(&local, cluster, None, now),
                };
                self.answer_worker(index, request, status, &body);
            }
            Message::PresenceJoin {
                channel,
                socket,
                channel_data,
            } => self.on_presence_join(index, channel, socket, &channel_data, now),
            Message::PusherRead { request, json } => {
                let (status, body) = match serde_json::from_slice(&json) {
                    Ok((app, read)) => self.pusher_read(app, &read, now),
                    Err(error) => (500, serde_json::json!({ "error": error.to_string() })),
                };
                self.answer_worker(index, request, status, &body);
            }
            Message::PresenceLeave { channel, socket } => {
                self.on_presence_leave(&channel, socket, now)
            }
            other => tracing::warn!(?other, "unexpected control message from a worker"),
        }
    }

    /// A worker took a publish: through the broker with a cluster (every node, this
    /// one too, gets it from there), else to every worker here.
    /// A worker's publication to `target`, leaving out the Pusher socket `exclude`.
    fn on_relay(
        &mut self,
        index: usize,
        request: u32,
        (target, exclude): (Target, Option<crate::pusher::SocketRef>),
        frame: Vec<u8>,
        now: Instant,
    ) {
        let Some(cluster) = self.cluster.as_mut() else {
            let origin = Origin::Worker {
                index: index as u32,
                request,
            };
            let position = match (self.history.as_mut(), target.topic()) {
                (Some(history), Some(topic)) => {
                    history.append(topic, bytes::Bytes::from(frame.clone()), now)
                }
                _ => None,
            };
            if let Some(position) = &position {
                self.positions
                    .insert((index as u32, request), position.clone());
            }
            let publish = Message::Publish {
                origin,
                target,
                position,
                exclude,
                frame,
            };
            self.relay(publish, None, now);
            return;
        };
        // A topic with history: the broker keeps it and gives its position.
        let keep = match (&self.history, target.topic()) {
            (Some(history), Some(topic)) => crate::broker::Keep::for_topic(history.policy(), topic),
            _ => None,
        };
        if let Err((_, request)) =
            cluster.publish((index as u32, request), (target, exclude), frame, keep, now)
        {
            self.workers[index].send(&Message::Done {
                request,
                delivery: Delivery::Refused,
                position: None,
            });
        }
    }

    /// Sends a publication (a `Message::Publish`) to every live worker and waits
    /// (bounded) for their counts.
    fn relay(&mut self, publish: Message, reply: Option<crate::broker::Reply>, now: Instant) {
        let Message::Publish { origin, .. } = publish else {
            return;
        };
        let mut bytes = Vec::new();
        publish.encode(&mut bytes);
        let (sent_to, skipped) = self.send_to_all(&bytes);
        if !matches!(origin, Origin::Clock | Origin::Master) {
            self.relays.start(origin, sent_to, skipped, reply, now);
        }
    }

    /// Queues encoded message bytes for every live worker and writes what the channels
    /// take. Returns which workers got them, and whether any live one was skipped
    /// because it is not reading.
    fn send_to_all(&mut self, bytes: &[u8]) -> (Vec<bool>, bool) {
        let mut skipped = false;
        let board = &self.scoreboard;
        let sent_to = self
            .workers
            .iter_mut()
            .enumerate()
            .map(|(index, worker)| {
                if !worker.is_alive() {
                    return false;
                }
                if !worker.queue(bytes) {
                    tracing::warn!(
                        worker = index,
                        "a worker is not reading its control channel; it misses a publication"
                    );
                    board.slot(index).publications_skipped.fetch_add(1, Relaxed);
                    skipped = true;
                    return false;
                }
                worker.flush();
                true
            })
            .collect();
        (sent_to, skipped)
    }

    /// What the broker link reported: publications to relay to the workers (their
    /// summed count goes back to the publishing node), answers to publishes.
    fn on_cluster_events(&mut self, now: Instant) {
        let Some(cluster) = self.cluster.as_mut() else {
            return;
        };
        for event in cluster.events(now) {
            match event {
                ClusterEvent::Deliver {
                    target,
                    frame,
                    reply,
                    position,
                    exclude,
                } => {
                    // Relayed with its position only if the copy listens to the topic
                    // (else it is in flight from a subscription that ended).
                    let position = match (&position, target.topic(), self.history.as_mut()) {
                        (Some(at), Some(topic), Some(history)) if self.copy.listens(topic) => {
                            let kept = bytes::Bytes::from(frame.clone());
                            self.copy.heard(topic, at, &kept, history, now);
                            position
                        }
                        _ => None,
                    };
                    let relay = self.next_relay;
                    self.next_relay = self.next_relay.wrapping_add(1);
                    let publish = Message::Publish {
                        origin: Origin::Broker { relay },
                        target,
                        position,
                        exclude,
                        frame,
                    };
                    self.relay(publish, Some(reply), now);
                }
                ClusterEvent::Finished(finished) => self.answer_cluster_publish(finished),
                ClusterEvent::Stored { id, stored } => self.on_stored(id, stored, now),
                ClusterEvent::Subscribed(topic) => {
                    if self.history.is_some() {
                        // In order with the relays: the workers' baseline restarts too.
                        let mut bytes = Vec::new();
                        Message::Listening {
                            topic: topic.clone(),
                        }
                        .encode(&mut bytes);
                        self.send_to_all(&bytes);
                    }
                    if let Some(history) = self.history.as_mut() {
                        self.copy.start(topic, history);
                    }
                }
                ClusterEvent::Up(up) => {
                    if let (false, Some(history)) = (up, self.history.as_mut()) {
                        self.copy.stop_all(history);
                    }
                    if let (true, Some(cluster)) = (up, &self.cluster) {
                        cluster.presence_state(&self.presence, true);
                    }
                    let mut bytes = Vec::new();
                    Message::BrokerUp { up }.encode(&mut bytes);
                    self.send_to_all(&bytes);
                }
                ClusterEvent::Presence(change) => {
                    let applied = match self.cluster.as_mut() {
                        Some(cluster) => cluster.apply_presence(&mut self.presence, &change, now),
                        None => Default::default(),
                    };
                    if let Some(topic) = applied.terminate {
                        self.terminate_on_workers(&topic);
                    }
                    self.presence_publish_all(applied.changes, now);
                }
            }
        }
    }

    /// Whether a worker's resume must ask the broker (a node in a cluster whose copy
    /// cannot answer it, see `ClusterCopy::needs_broker`).
    fn resumes_via_broker(&mut self, topic: &str, since: u64, epoch: &str, now: Instant) -> bool {
        match (&self.cluster, self.history.as_mut()) {
            (Some(_), Some(history)) => self.copy.needs_broker(topic, since, epoch, history, now),
            _ => false,
        }
    }

    /// Asks the broker for `topic` after `since` for worker `index`'s resume
    /// `request`; answered with `Recovered` when the broker's answer comes, after every
    /// publication it covers (the broker link hands it over only then).
    fn ask_broker_to_recover(
        &mut self,
        index: usize,
        request: u32,
        topic: &str,
        since: u64,
        epoch: String,
        now: Instant,
    ) {
        let limit = self.config.history.recovery_limit;
        let asked = self
            .cluster
            .as_mut()
            .and_then(|cluster| cluster.recover(topic, since, limit));
        match asked {
            Some(id) => self
                .copy
                .wait(id, (index, request), topic, since, epoch, now),
            None => self.workers[index].send(&Message::Recovered {
                request,
                outcome: Err(NotRecovered::BrokerUnavailable),
                position: None,
            }),
        }
    }

    /// Answers a worker's parked HTTP request `request`.
    fn answer_worker(&mut self, index: usize, request: u32, status: u16, body: &serde_json::Value) {
        if let Some(worker) = self.workers.get_mut(index) {
            worker.send(&Message::Answer {
                request,
                status,
                json: body.to_string().into_bytes(),
            });
        }
    }

    /// The broker answered a worker's resume or history read.
    fn on_stored(&mut self, id: u64, stored: Option<Stored>, now: Instant) {
        if self.history_reads.waits_for(id) {
            if let Some(((index, request), (status, body))) =
                self.history_reads.answered(id, stored)
            {
                self.answer_worker(index, request, status, &body);
            }
            return;
        }
        let Some(history) = self.history.as_mut() else {
            return;
        };
        let limit = self.config.history.recovery_limit;
        if let Some(((index, request), _, (outcome, position))) =
            self.copy.stored(id, stored, history, limit, now)
        {
            if let Some(worker) = self.workers.get_mut(index) {
                worker.send(&Message::Recovered {
                    request,
                    outcome,
                    position,
                });
            }
        }
    }

    /// Resumes the broker did not answer in time, and holds to end.
    fn broker_resume_timers(&mut self, now: Instant) {
        for ((index, request), (status, body)) in self.history_reads.expired(now) {
            tracing::warn!("a history read got no answer from the broker in time");
            self.answer_worker(index, request, status, &body);
        }
        for ((index, request), _) in self.copy.expired(now) {
            tracing::warn!("a resume got no answer from the broker in time");
            if let Some(worker) = self.workers.get_mut(index) {
                worker.send(&Message::Recovered {
                    request,
                    outcome: Err(NotRecovered::BrokerUnavailable),
                    position: None,
                });
            }
        }
        for topic in self.copy.due_releases(now) {
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.release(&topic);
            }
            self.stop_listening_unless_subscribed(&topic);
        }
    }

    /// After an interest change or a hold's end: a topic the node no longer listens
    /// to loses its copy.
    fn stop_listening_unless_subscribed(&mut self, topic: &str) {
        let (Some(cluster), Some(history)) = (&self.cluster, self.history.as_mut()) else {
            return;
        };
        if !cluster.listens_to(topic) {
            self.copy.stop(topic, history);
        }
    }

    /// Answers the worker that took a publish through the cluster, once it is over.
    fn answer_cluster_publish(&mut self, finished: Finished<WorkerRequest>) {
        let (worker, message) = match finished {
            Finished::Refused((worker, request)) => (
                worker,
                Message::Done {
                    request,
                    delivery: Delivery::Refused,
                    position: None,
                },
            ),
            Finished::Delivered((worker, request), body) => (
                worker,
                Message::Answer {
                    request,
                    status: 200,
                    json: body.to_string().into_bytes(),
                },
            ),
        };
        if let Some(w) = self.workers.get_mut(worker as usize) {
            w.send(&message);
        }
    }

    /// Answers every relay that is over: the origin worker of a local publish, the
    /// publishing node of one from the broker.
    fn finish_relays(&mut self, now: Instant) {
        for Counted {
            origin,
            delivery,
            reply,
        } in self.relays.take_finished(now)
        {
            match origin {
                Origin::Worker { index, request } => {
                    let position = self.positions.remove(&(index, request));
                    if let Some(worker) = self.workers.get_mut(index as usize) {
                        worker.send(&Message::Done {
                            request,
                            delivery,
                            position,
                        });
                    }
                }
                Origin::Broker { .. } => {
                    if let (Some(cluster), Some(reply), Delivery::Counted { connections, .. }) =
                        (&self.cluster, reply, delivery)
                    {
                        cluster.ack(reply, connections);
                    }
                }
                Origin::Clock | Origin::Master => {}
            }
        }
    }

    /// Every loop turn: relays and cluster publishes that are over, the node report,
    /// the clock, the stats line; then everything queued for the workers is written.
    fn on_tick(&mut self, now: Instant) {
        self.finish_relays(now);
        self.webhooks.flush_due(now);
        self.broker_resume_timers(now);
        if let Some(cluster) = self.cluster.as_mut() {
            for finished in cluster.expire(now) {
                self.answer_cluster_publish(finished);
            }
        }
        if self.cluster.as_mut().is_some_and(|c| c.report_due(now)) {
            let report = self.node_report();
            if let Some(cluster) = self.cluster.as_mut() {
                cluster.send_report(&report);
                // The workers hold the apps' quotas with the other nodes' counts.
                let elsewhere: Vec<u64> = (self.config.pusher_apps.iter())
                    .map(|app| cluster.app_connections_elsewhere(&app.id, now))
                    .collect();
                self.scoreboard.set_apps_elsewhere(&elsewhere);
                let speaks = cluster.speaks_for_the_cluster(now);
                let gone = cluster.expire_presence(&mut self.presence, now);
                self.presence_expired(gone, speaks, now);
            }
        }
        if self.clock.due(now, self.scoreboard.total_open() as usize) {
            let (stamp, frame) = self.clock.stamp();
            let time = Target::Topic(crate::topics::TIME.to_string());
            // Each node stamps its own clock: in a cluster its ticks are not the
            // broker's publications, and get no position.
            let position = self
                .history
                .as_mut()
                .filter(|_| self.cluster.is_none())
                .and_then(|history| history.append(crate::topics::TIME, frame.clone(), now));
            let tick = Message::Publish {
                origin: Origin::Clock,
                target: time,
                position,
                exclude: None,
                frame: frame.to_vec(),
            };
            self.relay(tick, None, now);
            tracing::debug!(stamp, "broadcast relayed to workers");
        }
        if now >= self.next_stats {
            self.next_stats = now + self.config.stats_interval;
            self.stats_line(now);
            self.step_ticket_key();
        }
        if let Some(history) = self
            .history
            .as_mut()
            .filter(|_| now >= self.next_history_expiry)
        {
            self.next_history_expiry = now + Duration::from_secs(1);
            history.expire(now);
            self.scoreboard.set_history_usage(&history.usage());
            let largest: Vec<(&str, usize)> = history
                .largest(crate::history::REPORTED_LARGEST)
                .into_iter()
                .map(|(topic, _, bytes)| (topic, bytes))
                .collect();
            let json = serde_json::to_vec(&largest).unwrap_or_default();
            for worker in &mut self.workers {
                worker.send(&Message::HistoryLargest { json: json.clone() });
            }
        }
        let counts = self.webhooks.counts();
        if let Some(counts) = counts.filter(|_| now >= self.next_webhook_counts) {
            self.next_webhook_counts = now + Duration::from_secs(1);
            let json = serde_json::to_vec(&counts).unwrap_or_default();
            for worker in &mut self.workers {
                worker.send(&Message::WebhookCounts { json: json.clone() });
            }
        }
        for worker in &mut self.workers {
            worker.flush();
        }
    }

    fn signal_all(&self, signal: libc::c_int) {
        for worker in &self.workers {
            worker.signal(signal);
        }
    }

    /// The node's numbers: connections from the scoreboard, topics from the workers.
    fn node_report(&self) -> NodeReport {
        let mut counts = TopicCounts::default();
        for part in &self.worker_counts {
            counts.add(part);
        }
        let slots = self.scoreboard.slots();
        NodeReport {
            node: self.node.clone(),
            connections: self.scoreboard.total_open(),
            workers: self.workers.iter().filter(|w| w.is_alive()).count() as u64,
            messages_out: slots.iter().map(|s| s.frames_out.load(Relaxed)).sum(),
            last_fanout_us: slots
                .iter()
                .map(|s| s.last_fanout_us.load(Relaxed))
                .max()
                .unwrap_or(0),
            rss_bytes: slots.iter().map(|s| s.rss_bytes.load(Relaxed)).sum::<u64>()
                + crate::counters::rss_bytes().unwrap_or(0),
            pusher_apps: crate::app_connections::by_app_id(&self.config.pusher_apps, |app| {
                self.scoreboard.app_count(app)
            }),
            counts: counts.cap(),
        }
    }

    /// Moves the shared ticket key to the current period (erasing the old one), for
    /// workers started from now on; the running ones step their own copies.
    fn step_ticket_key(&mut self) {
        let period = period_at(SystemTime::now());
        if period > self.ticket_key.period {
            self.ticket_key = self.ticket_key.advanced_to(period);
            self.scoreboard.put_ticket_key(&self.ticket_key);
        }
    }

    /// One stats line for the whole server, summed over the scoreboard.
    fn stats_line(&mut self, now: Instant) {
        let slots = self.scoreboard.slots();
        let sum = |f: fn(&crate::scoreboard::Slot) -> u64| slots.iter().map(f).sum::<u64>();
        let frames = sum(|s| s.frames_out.load(Relaxed));
        let (last_at, last_frames) = self.last_frames;
        let rate =
            frames.saturating_sub(last_frames) as f64 / (now - last_at).as_secs_f64().max(1e-9);
        self.last_frames = (now, frames);
        let fanout_ms = slots
            .iter()
            .map(|s| s.last_fanout_us.load(Relaxed))
            .max()
            .unwrap_or(0) as f64
            / 1e3;
        tracing::info!(
            open = sum(|s| s.open.load(Relaxed)),
            sockets = sum(|s| s.open.load(Relaxed) + s.other_sockets.load(Relaxed)),
            workers = self.workers.iter().filter(|w| w.is_alive()).count(),
            restarts = self.workers.iter().map(|w| w.restarts).sum::<u32>(),
            relays_waiting = self.relays.len(),
            msgs_out_per_s = format_args!("{rate:.0}"),
            slowest_worker_fanout_ms = format_args!("{fanout_ms:.1}"),
            rss_mib = format_args!(
                "{:.1}",
                sum(|s| s.rss_bytes.load(Relaxed)) as f64 / (1 << 20) as f64
            ),
            rejected_full = sum(|s| s.rejected_full.load(Relaxed)),
            "stats"
        );
    }
}
