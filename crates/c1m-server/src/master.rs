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
//!   the master sends it to every worker and sums their delivery counts for the answer;
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

use std::collections::HashMap;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::broker::{self, BrokerLink};
use crate::clock::Clock;
use crate::config::ServeConfig;
use crate::control::{Message, BROKER_ORIGIN, NO_ORIGIN, REFUSED};
use crate::node_stats::{self, ClusterView, NodeReport, TopicCounts};
use crate::publish_acks::{Finished, PublishAcks};
use crate::scoreboard::Scoreboard;
use crate::server::{listen_socket, ServeError};

const SIGNALS: Token = Token(usize::MAX - 1);
const BROKER: Token = Token(usize::MAX - 2);

/// Most bytes queued for one worker; past it the worker is not reading and misses
/// publications (logged) rather than growing the master without bound.
const MAX_PENDING_TO_WORKER: usize = 16 << 20;

/// The descriptors a worker process must inherit, and its place in the scoreboard.
#[derive(Debug, Clone, Copy)]
pub struct WorkerFds {
    pub index: usize,
    pub count: usize,
    pub listen_fd: RawFd,
    pub control_fd: RawFd,
    pub scoreboard_fd: RawFd,
}

/// One worker as the master sees it.
struct WorkerProcess {
    child: Option<Child>,
    /// Master's end of the control channel (non-blocking).
    control: UnixStream,
    /// Bytes of messages not yet written to `control`.
    pending: Vec<u8>,
    /// Bytes read from `control` not yet forming a complete message.
    incoming: Vec<u8>,
    restarts: u32,
}

/// The node's cluster link (`--broker`), held by the master for all its workers.
struct MasterCluster {
    link: BrokerLink,
    up: bool,
    next_id: u64,
    /// Publishes handed to the broker, waiting for its confirmation and the nodes'
    /// counts: answered to (origin worker, its request).
    acks: PublishAcks<(u32, u32)>,
    /// The next id of a publication from the broker relayed to the workers.
    next_relay: u32,
    /// Topics with local subscribers, and which workers have them.
    interest: HashMap<String, std::collections::HashSet<usize>>,
    /// The other nodes' latest reports.
    view: ClusterView,
}

impl MasterCluster {
    /// A worker has (or no longer has) subscribers of `topic`; the broker subscription
    /// follows the first and the last.
    fn interest(&mut self, worker: usize, topic: String, on: bool) {
        if on {
            let workers = self.interest.entry(topic.clone()).or_default();
            if workers.is_empty() {
                self.link.send(broker::Command::Subscribe(topic));
            }
            workers.insert(worker);
        } else if let Some(workers) = self.interest.get_mut(&topic) {
            workers.remove(&worker);
            if workers.is_empty() {
                self.interest.remove(&topic);
                self.link.send(broker::Command::Unsubscribe(topic));
            }
        }
    }

    /// A worker died: it has no subscribers any more.
    fn forget_worker(&mut self, worker: usize) {
        let topics: Vec<String> = self
            .interest
            .iter()
            .filter(|(_, workers)| workers.contains(&worker))
            .map(|(topic, _)| topic.clone())
            .collect();
        for topic in topics {
            self.interest(worker, topic, false);
        }
    }
}

/// A publish relayed to every worker, waiting for their delivery counts.
struct Relayed {
    /// Workers that have answered (or died meanwhile).
    answered: Vec<bool>,
    count: u64,
    /// For a publication from the broker: where the sum goes (the publishing node).
    reply: Option<broker::Reply>,
}

/// Runs the master. `spawn` starts worker process `fds.index` so that it inherits the
/// three descriptors in `fds` (the binary knows how to re-execute itself).
pub fn run_master(
    config: ServeConfig,
    workers: usize,
    spawn: impl Fn(WorkerFds) -> io::Result<Child>,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<(), ServeError> {
    // Check what workers would otherwise each fail on, once, with a clear error.
    if let Some(files) = &config.tls {
        crate::tls::load(files)?;
    }
    crate::auth::Gate::new(
        config.allowed_origins.clone(),
        config.jwt.as_ref(),
        config.max_topics_per_connection,
    )?;
    let addr = config.listen;
    let listen_error = |source| ServeError::Listen { addr, source };
    let listener = listen_socket(addr, config.backlog, config.reuse_port).map_err(listen_error)?;
    let local_addr = listener.local_addr()?;
    // Signal handlers first: a SIGTERM that arrives while workers start must still drain.
    let poll = Poll::new()?;
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGCHLD, SIGHUP])?;
    poll.registry()
        .register(&mut signals, SIGNALS, Interest::READABLE)?;
    let scoreboard = Scoreboard::create(workers)?;
    let mut procs = Vec::with_capacity(workers);
    for index in 0..workers {
        let mut worker = start_worker(&spawn, index, workers, listener.as_raw_fd(), &scoreboard)?;
        register_control(&poll, &mut worker, index)?;
        procs.push(worker);
    }
    let mut relayed: HashMap<(u32, u32), Relayed> = HashMap::new();
    let node = node_stats::node_id(local_addr);
    let mut cluster = match &config.broker {
        None => None,
        Some(url) => {
            let waker = std::sync::Arc::new(mio::Waker::new(poll.registry(), BROKER)?);
            Some(MasterCluster {
                link: BrokerLink::start(url.clone(), &node, move || {
                    let _ = waker.wake();
                })?,
                up: false,
                next_id: 0,
                acks: PublishAcks::default(),
                next_relay: 0,
                interest: HashMap::new(),
                view: ClusterView::default(),
            })
        }
    };
    tracing::info!(addr = %local_addr, workers, "listening");
    on_listening(local_addr);

    let mut events = Events::with_capacity(64);
    let start = Instant::now();
    let mut clock = Clock::new(&config, start);
    let mut next_stats = start + config.stats_interval;
    let mut last_frames = (start, 0u64);
    let mut shutdown_deadline: Option<Instant> = None;
    let mut poll = poll;
    // Each worker's latest topic counts (empty until it sends, and after it dies).
    let mut worker_counts = vec![TopicCounts::default(); workers];
    let mut next_node_report = start;

    loop {
        let now = Instant::now();
        let wake = [clock.deadline(), Some(next_stats), shutdown_deadline]
            .into_iter()
            .flatten()
            .min()
            .map(|at| {
                at.saturating_duration_since(now)
                    .min(Duration::from_millis(50))
            });
        if let Err(e) = poll.poll(&mut events, wake) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        let now = Instant::now();
        let mut reap = false;
        for signal in signals.pending() {
            match signal {
                SIGCHLD => reap = true,
                // Each worker reloads its own TLS certificate.
                SIGHUP => kill_all(&mut procs, libc::SIGHUP),
                _ if shutdown_deadline.is_some() => {
                    tracing::warn!("second signal: killing workers now");
                    kill_all(&mut procs, libc::SIGKILL);
                    return Ok(());
                }
                _ => {
                    tracing::info!("shutting down: stopping every worker");
                    kill_all(&mut procs, libc::SIGTERM);
                    shutdown_deadline = Some(now + config.close_timeout + Duration::from_secs(2));
                }
            }
        }
        // Catch exits whose SIGCHLD merged with another, too.
        if reap || shutdown_deadline.is_some() {
            let died = reap_exited(
                &mut procs,
                &scoreboard,
                shutdown_deadline.is_none(),
                |index| {
                    let mut worker =
                        start_worker(&spawn, index, workers, listener.as_raw_fd(), &scoreboard)?;
                    register_control(&poll, &mut worker, index)?;
                    Ok(worker)
                },
            );
            // A dead worker will not answer: count it as done for every waiting publish.
            for index in died {
                for waiting in relayed.values_mut() {
                    waiting.answered[index] = true;
                }
                worker_counts[index] = TopicCounts::default();
                if let Some(cluster) = cluster.as_mut() {
                    cluster.forget_worker(index);
                    // Its replacement learns the link's state.
                    Message::BrokerUp { up: cluster.up }.encode(&mut procs[index].pending);
                }
            }
            finish_relayed(&mut relayed, &mut procs, cluster.as_ref());
        }
        if let Some(deadline) = shutdown_deadline {
            if procs.iter().all(|p| p.child.is_none()) {
                tracing::info!("shutdown complete");
                return Ok(());
            }
            if now >= deadline {
                tracing::warn!("workers did not stop in time: killing them");
                kill_all(&mut procs, libc::SIGKILL);
                for p in &mut procs {
                    if let Some(mut child) = p.child.take() {
                        let _ = child.wait();
                    }
                }
                return Ok(());
            }
            continue;
        }
        for index in 0..procs.len() {
            for message in read_messages(&mut procs[index]) {
                match message {
                    Message::Relay {
                        request,
                        topic,
                        frame,
                    } if cluster.is_some() => {
                        // Through the broker: every node (this one too) gets it from there.
                        let cluster = cluster.as_mut().expect("matched");
                        if !cluster.up {
                            Message::Done {
                                request,
                                count: REFUSED,
                            }
                            .encode(&mut procs[index].pending);
                            continue;
                        }
                        let id = cluster.next_id;
                        cluster.next_id += 1;
                        // The workers' interest says whether this node has subscribers.
                        let local_has = cluster.interest.contains_key(&topic);
                        let expected = cluster.view.nodes_with(&topic, &node, local_has, now);
                        let who = (index as u32, request);
                        cluster.acks.start(id, who, &topic, expected, now);
                        cluster
                            .link
                            .send(broker::Command::Publish { id, topic, frame });
                    }
                    Message::Interest { topic, on } => {
                        if let Some(cluster) = cluster.as_mut() {
                            cluster.interest(index, topic, on);
                        }
                    }
                    Message::Relay {
                        request,
                        topic,
                        frame,
                    } => {
                        let origin = index as u32;
                        let answered = procs.iter().map(|p| p.child.is_none()).collect();
                        let waiting = Relayed {
                            answered,
                            count: 0,
                            reply: None,
                        };
                        relayed.insert((origin, request), waiting);
                        send_to_all(
                            &mut procs,
                            &Message::Publish {
                                origin,
                                request,
                                topic,
                                frame,
                            },
                        );
                    }
                    Message::Delivered {
                        origin,
                        request,
                        count,
                    } => {
                        if let Some(waiting) = relayed.get_mut(&(origin, request)) {
                            waiting.answered[index] = true;
                            waiting.count += count;
                        }
                    }
                    Message::TopicCounts { json } => match serde_json::from_slice(&json) {
                        Ok(counts) => worker_counts[index] = counts,
                        Err(error) => tracing::warn!(%error, "bad topic counts from a worker"),
                    },
                    Message::StatsRequest {
                        request,
                        cluster: want_cluster,
                    } => {
                        let local = node_report(&node, &scoreboard, &procs, &worker_counts);
                        let view = cluster.as_mut().map(|c| (&mut c.view, c.up));
                        let (status, body) =
                            node_stats::answer(&local, want_cluster, view, Instant::now());
                        Message::Answer {
                            request,
                            status,
                            json: body.to_string().into_bytes(),
                        }
                        .encode(&mut procs[index].pending);
                    }
                    other => tracing::warn!(?other, "unexpected control message from a worker"),
                }
            }
        }
        if let Some(cluster) = cluster.as_mut() {
            broker_events(cluster, &mut procs, &mut relayed, now);
            for finished in cluster.acks.expire(now) {
                answer_cluster_publish(finished, &mut procs);
            }
            if now >= next_node_report {
                next_node_report = now + node_stats::REPORT_EVERY;
                if cluster.up {
                    let local = node_report(&node, &scoreboard, &procs, &worker_counts);
                    let report = serde_json::to_vec(&local).unwrap_or_default();
                    cluster.link.send(broker::Command::Report(report));
                }
            }
        }
        finish_relayed(&mut relayed, &mut procs, cluster.as_ref());
        for p in &mut procs {
            flush(p);
        }
        if clock.due(now, scoreboard.total_open() as usize) {
            let (stamp, frame) = clock.stamp();
            let message = Message::Publish {
                origin: NO_ORIGIN,
                request: 0,
                topic: crate::topics::TIME.to_string(),
                frame: frame.to_vec(),
            };
            send_to_all(&mut procs, &message);
            tracing::debug!(stamp, "broadcast relayed to workers");
        }
        if now >= next_stats {
            next_stats = now + config.stats_interval;
            report(&scoreboard, now, &mut last_frames, &procs);
        }
    }
}

fn start_worker(
    spawn: &impl Fn(WorkerFds) -> io::Result<Child>,
    index: usize,
    count: usize,
    listen_fd: RawFd,
    scoreboard: &Scoreboard,
) -> io::Result<WorkerProcess> {
    scoreboard.reset(index);
    let (master_end, worker_end) = UnixStream::pair()?;
    master_end.set_nonblocking(true)?;
    let child = spawn(WorkerFds {
        index,
        count,
        listen_fd,
        control_fd: worker_end.as_raw_fd(),
        scoreboard_fd: scoreboard.raw_fd(),
    })?;
    drop(worker_end); // the child has its copy
    Ok(WorkerProcess {
        child: Some(child),
        control: master_end,
        pending: Vec::new(),
        incoming: Vec::new(),
        restarts: 0,
    })
}

/// Watches a worker's control channel for its messages (token = worker index).
fn register_control(poll: &Poll, worker: &mut WorkerProcess, index: usize) -> io::Result<()> {
    let fd = worker.control.as_raw_fd();
    poll.registry().register(
        &mut mio::unix::SourceFd(&fd),
        Token(index),
        Interest::READABLE,
    )
}

/// Reads what a worker sent; a worker that sends garbage is logged and ignored.
fn read_messages(p: &mut WorkerProcess) -> Vec<Message> {
    if p.child.is_none() {
        return Vec::new();
    }
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match p.control.read(&mut chunk) {
            Ok(0) => break, // the worker is gone; the reaper restarts it
            Ok(n) => p.incoming.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break, // WouldBlock, or the worker died
        }
    }
    match Message::decode_all(&mut p.incoming) {
        Ok(messages) => messages,
        Err(error) => {
            tracing::warn!(%error, "bad message from a worker; dropping its input");
            p.incoming.clear();
            Vec::new()
        }
    }
}

/// Queues a message for every live worker and writes what the channels take.
fn send_to_all(procs: &mut [WorkerProcess], message: &Message) {
    let mut bytes = Vec::new();
    message.encode(&mut bytes);
    for p in procs.iter_mut().filter(|p| p.child.is_some()) {
        if p.pending.len() > MAX_PENDING_TO_WORKER {
            tracing::warn!("a worker is not reading its control channel; it misses a publication");
            continue;
        }
        p.pending.extend_from_slice(&bytes);
        flush(p);
    }
}

/// Passes what the broker link reported on to the workers. A publication is relayed
/// like a local publish (the workers' counts are summed in `relayed`), and the sum goes
/// back to the publishing node.
fn broker_events(
    cluster: &mut MasterCluster,
    procs: &mut [WorkerProcess],
    relayed: &mut HashMap<(u32, u32), Relayed>,
    now: Instant,
) {
    while let Some(event) = cluster.link.next_event() {
        match event {
            broker::Event::Message {
                topic,
                frame,
                reply,
            } => {
                let request = cluster.next_relay;
                cluster.next_relay = cluster.next_relay.wrapping_add(1);
                let answered = procs.iter().map(|p| p.child.is_none()).collect();
                let waiting = Relayed {
                    answered,
                    count: 0,
                    reply: Some(reply),
                };
                relayed.insert((BROKER_ORIGIN, request), waiting);
                let publish = Message::Publish {
                    origin: BROKER_ORIGIN,
                    request,
                    topic,
                    frame,
                };
                send_to_all(procs, &publish);
            }
            broker::Event::Published { id, ok } => {
                if let Some(finished) = cluster.acks.confirmed(id, ok) {
                    answer_cluster_publish(finished, procs);
                }
            }
            broker::Event::Ack {
                id,
                node,
                delivered,
            } => {
                if let Some(finished) = cluster.acks.ack(id, node, delivered) {
                    answer_cluster_publish(finished, procs);
                }
            }
            broker::Event::Report(report) => {
                if let Err(error) = cluster.view.record(&report, now) {
                    tracing::warn!(%error, "ignoring a node report from the broker");
                }
            }
            broker::Event::Up(up) => {
                if cluster.up != up {
                    tracing::warn!(up, "broker link");
                }
                cluster.up = up;
                send_to_all(procs, &Message::BrokerUp { up });
            }
        }
    }
}

/// Answers the worker that took a publish through the cluster, once it is over.
fn answer_cluster_publish(finished: Finished<(u32, u32)>, procs: &mut [WorkerProcess]) {
    let (worker, message) = match finished {
        Finished::Refused((worker, request)) => (
            worker,
            Message::Done {
                request,
                count: REFUSED,
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
    if let Some(p) = procs.get_mut(worker as usize) {
        message.encode(&mut p.pending);
    }
}

/// Answers every relayed publish that all workers have counted: the origin worker of a
/// local one, the publishing node of one from the broker.
fn finish_relayed(
    relayed: &mut HashMap<(u32, u32), Relayed>,
    procs: &mut [WorkerProcess],
    cluster: Option<&MasterCluster>,
) {
    relayed.retain(|&(origin, request), waiting| {
        if !waiting.answered.iter().all(|&a| a) {
            return true;
        }
        if let Some(reply) = waiting.reply.take() {
            if let Some(cluster) = cluster {
                let delivered = waiting.count;
                cluster.link.send(broker::Command::Ack { reply, delivered });
            }
            return false;
        }
        if let Some(p) = procs.get_mut(origin as usize) {
            Message::Done {
                request,
                count: waiting.count,
            }
            .encode(&mut p.pending);
            flush(p);
        }
        false
    });
}

/// Writes what the control channel takes now; the rest waits for the next turn. An
/// error means the worker died: the reaper restarts it.
fn flush(p: &mut WorkerProcess) {
    let _ = crate::control::write_queued(&mut p.control, &mut p.pending);
}

fn kill_all(procs: &mut [WorkerProcess], signal: libc::c_int) {
    for p in procs.iter() {
        if let Some(child) = &p.child {
            // SAFETY: kill(2) on the PID of a child we started and have not reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, signal) };
        }
    }
}

/// Collects exited workers; while serving, starts a replacement for each. Returns the
/// indexes of the workers that exited.
fn reap_exited(
    procs: &mut [WorkerProcess],
    scoreboard: &Scoreboard,
    respawn: bool,
    start: impl Fn(usize) -> io::Result<WorkerProcess>,
) -> Vec<usize> {
    let mut died = Vec::new();
    for (index, worker) in procs.iter_mut().enumerate() {
        let Some(child) = worker.child.as_mut() else {
            continue;
        };
        let Ok(Some(status)) = child.try_wait() else {
            continue;
        };
        worker.child = None;
        died.push(index);
        scoreboard.reset(index);
        if !respawn {
            continue;
        }
        tracing::warn!(worker = index, %status, "worker exited; starting a new one");
        match start(index) {
            Ok(mut fresh) => {
                fresh.restarts = worker.restarts + 1;
                *worker = fresh;
            }
            Err(error) => tracing::error!(worker = index, %error, "cannot restart worker"),
        }
    }
    died
}

/// The node's numbers: connections from the scoreboard, topics from the workers.
fn node_report(
    node: &str,
    scoreboard: &Scoreboard,
    procs: &[WorkerProcess],
    worker_counts: &[TopicCounts],
) -> NodeReport {
    let mut counts = TopicCounts::default();
    for part in worker_counts {
        counts.add(part);
    }
    let slots = scoreboard.slots();
    NodeReport {
        node: node.to_string(),
        connections: scoreboard.total_open(),
        workers: procs.iter().filter(|p| p.child.is_some()).count() as u64,
        messages_out: slots.iter().map(|s| s.frames_out.load(Relaxed)).sum(),
        last_fanout_us: slots
            .iter()
            .map(|s| s.last_fanout_us.load(Relaxed))
            .max()
            .unwrap_or(0),
        rss_bytes: slots.iter().map(|s| s.rss_bytes.load(Relaxed)).sum::<u64>()
            + crate::stats::rss_bytes().unwrap_or(0),
        counts: counts.cap(),
    }
}

/// One stats line for the whole server, summed over the scoreboard.
fn report(
    scoreboard: &Scoreboard,
    now: Instant,
    last: &mut (Instant, u64),
    procs: &[WorkerProcess],
) {
    let slots = scoreboard.slots();
    let sum = |f: fn(&crate::scoreboard::Slot) -> u64| slots.iter().map(f).sum::<u64>();
    let frames = sum(|s| s.frames_out.load(Relaxed));
    let rate = (frames.saturating_sub(last.1)) as f64 / (now - last.0).as_secs_f64().max(1e-9);
    *last = (now, frames);
    let fanout_ms = slots
        .iter()
        .map(|s| s.last_fanout_us.load(Relaxed))
        .max()
        .unwrap_or(0) as f64
        / 1e3;
    tracing::info!(
        open = sum(|s| s.open.load(Relaxed)),
        sockets = sum(|s| s.open.load(Relaxed) + s.other_sockets.load(Relaxed)),
        workers = procs.iter().filter(|p| p.child.is_some()).count(),
        restarts = procs.iter().map(|p| p.restarts).sum::<u32>(),
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
