//! The event loop: accept, read, broadcast, time out, shut down.
//!
//! One `mio::Poll` (epoll, edge-triggered) drives everything on one thread. Each
//! socket is registered once for both readable and writable readiness; with edge
//! triggering an idle connection costs no wake-ups, and a writable event only arrives
//! after a write came back short. Timeouts need no timer per connection: every
//! handshake gets the same time limit, so deadlines are pushed in order and kept in a
//! FIFO (likewise for closing connections); the loop pops the expired ones.
//!
//! Shutdown protocol: SIGINT/SIGTERM stops accepting, sends close 1001 to every open
//! connection and waits up to `close_timeout` for the close handshakes; a second signal
//! exits at once.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use c1m_proto::deflate::{self, Inflater};
use c1m_proto::frame::{encode_compressed_frame, split_frame};
use c1m_proto::{encode_frame, CloseCode, DecoderConfig, OpCode, Role};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::{Domain, Socket, Type};

use crate::auth::{AuthConfigError, Gate};
use crate::broker::{self, BrokerLink};
use crate::clock::Clock;
use crate::commands::{self, Command};
use crate::config::ServeConfig;
use crate::connection::{
    Action, Admit, Connection, End, Limits, Next, PhaseKind, ReadContext, SendError,
    SlowConsumerPolicy,
};
use crate::control::{write_queued, Message, ALL_CONNECTIONS, NO_ORIGIN, REFUSED};
use crate::http::{self, Outcome};
use crate::metrics::{self, Histogram, DURATION_BUCKETS};
use crate::node_stats::{self, ClusterView, NodeReport, TopicCounts};
use crate::per_ip::PerIp;
use crate::publish_acks::{Finished, PublishAcks};
use crate::scoreboard::Scoreboard;
use crate::stats::{rss_bytes, Stats};
use crate::topics::{validate_name, TopicId, Topics};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const CONTROL: Token = Token(usize::MAX - 3);
const BROKER: Token = Token(usize::MAX - 4);

/// The worker's read buffer, shared by all its connections (see `connection`).
const SCRATCH_BYTES: usize = 64 * 1024;

/// After an accept error such as EMFILE, wait this long before accepting again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: io::Error },
    #[error("event loop failed: {0}")]
    Poll(#[from] io::Error),
    #[error(transparent)]
    Auth(#[from] AuthConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Binds the listener, calls `on_listening` with the bound address, then serves until
/// a shutdown signal.
pub fn run(config: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let addr = config.listen;
    let listen_error = |source| ServeError::Listen { addr, source };
    let listener = listen_socket(addr, config.backlog, config.reuse_port).map_err(listen_error)?;
    let mut server = Server::new(config, listener, None)?;
    on_listening(server.local_addr);
    server.serve()
}

/// What a worker process of a multi-process server gets from its master (see `master`).
#[derive(Debug)]
pub struct WorkerRole {
    pub index: usize,
    /// Counters shared with the master and the other workers.
    pub scoreboard: Scoreboard,
    /// Broadcast frames from the master: each a little-endian u32 length, then the
    /// complete WebSocket frame to send to every open connection.
    pub control: std::os::unix::net::UnixStream,
}

/// Runs a worker on a listening socket inherited from the master.
pub fn run_worker(
    config: ServeConfig,
    listener: std::net::TcpListener,
    role: WorkerRole,
) -> Result<(), ServeError> {
    listener.set_nonblocking(true)?;
    let mut server = Server::new(config, TcpListener::from_std(listener), Some(role))?;
    server.serve()
}

struct Server {
    config: ServeConfig,
    limits: Limits,
    gate: Gate,
    /// The TLS configuration of a `wss://` server (replaced on SIGHUP).
    tls: Option<Arc<rustls::ServerConfig>>,
    poll: Poll,
    /// `None` once shutdown has begun.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Signals,
    conns: Slab<Connection>,
    topics: Topics,
    /// Sockets per client address, when `--max-connections-per-ip` is set.
    per_ip: Option<PerIp>,
    clock: Clock,
    stats: Stats,
    scratch: Box<[u8]>,
    /// permessage-deflate: one decompressor and output buffer for the whole worker
    /// (each message is inflated whole, once it has arrived: no context takeover).
    inflater: Inflater,
    inflated: Vec<u8>,
    /// (slab key, deadline) of connections in the handshake or waiting for an HTTP
    /// answer, oldest first.
    handshake_deadlines: VecDeque<(usize, Instant)>,
    /// (slab key, deadline) of closing connections, oldest first.
    closing_deadlines: VecDeque<(usize, Instant)>,
    /// Connections whose input was not drained in their last turn.
    read_again: Vec<usize>,
    /// Reused buffer for what a connection hands back after a read.
    actions: Vec<Action>,
    accept_paused_until: Option<Instant>,
    /// Whether the listener is in the epoll set (it is taken out while this process is
    /// full or out of descriptors, so the kernel queues connections for other workers).
    accepting: bool,
    shutdown_deadline: Option<Instant>,
    next_stats: Instant,
    /// When this process next reports its numbers (to the master, or on the broker).
    next_node_report: Instant,
    /// This node's name in cluster reports (see `node_stats::node_id`).
    node: String,
    /// The idle sweep: when it runs next, and every how often (see `sweep`).
    next_sweep: Option<Instant>,
    sweep_every: Duration,
    ping_frame: Bytes,
    fanout_seconds: Histogram,
    publish_seconds: Histogram,
    /// Set in a worker process; `None` for a single-process server.
    worker: Option<Worker>,
    /// The cluster: this process's broker link (single process) or the master's state
    /// (worker). `None` without `--broker`.
    cluster: Option<Cluster>,
}

/// A node's view of its cluster (see `broker`).
struct Cluster {
    /// The link itself, in a single-process server (a worker's master holds it).
    link: Option<BrokerLink>,
    up: bool,
    next_id: u64,
    /// Publishes handed to the link, waiting for its confirmation and the nodes' counts.
    acks: PublishAcks<Waiting>,
    /// The other nodes' latest reports (single process; a worker's master keeps them).
    view: ClusterView,
}

/// The worker side of a multi-process server.
struct Worker {
    index: usize,
    scoreboard: Scoreboard,
    control: UnixStream,
    /// Bytes read from `control` not yet forming a complete message.
    control_in: Vec<u8>,
    /// Messages for the master not yet written.
    control_out: Vec<u8>,
    next_request: u32,
    /// Requests handed to the master (publishes, `/stats`), waiting for its answer.
    waiting: HashMap<u32, Waiting>,
}

/// An HTTP request whose answer waits for the master or the broker.
struct Waiting {
    key: usize,
    /// The connection's deadline, which identifies it if its slab key was reused.
    deadline: Option<Instant>,
    started: Instant,
    /// The topic of a publish; `None` for `GET /stats`.
    topic: Option<String>,
    /// Whether the client asked to keep the connection for another request.
    keep_alive: bool,
}

impl Waiting {
    fn new(
        conn: &Connection,
        key: usize,
        keep_alive: bool,
        topic: Option<&str>,
        started: Instant,
    ) -> Waiting {
        Waiting {
            key,
            deadline: conn.deadline(),
            started,
            topic: topic.map(str::to_string),
            keep_alive,
        }
    }
}

impl Server {
    fn new(
        config: ServeConfig,
        listener: TcpListener,
        role: Option<WorkerRole>,
    ) -> Result<Server, ServeError> {
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let worker = match role {
            None => None,
            Some(role) => {
                role.control.set_nonblocking(true)?;
                let mut control = UnixStream::from_std(role.control);
                poll.registry().register(
                    &mut control,
                    CONTROL,
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                role.scoreboard.reset(role.index);
                role.scoreboard
                    .slot(role.index)
                    .pid
                    .store(std::process::id() as u64, Relaxed);
                Some(Worker {
                    index: role.index,
                    scoreboard: role.scoreboard,
                    control,
                    control_in: Vec::new(),
                    control_out: Vec::new(),
                    next_request: 0,
                    waiting: HashMap::new(),
                })
            }
        };
        let tls = config.tls.as_ref().map(crate::tls::load).transpose()?;
        let gate = Gate::new(
            config.allowed_origins.clone(),
            config.jwt.as_ref(),
            config.max_topics_per_connection,
        )?;
        let now = Instant::now();
        let mut clock_config = config.clone();
        // A worker broadcasts what its master sends; only a single process keeps time.
        clock_config.connect_only |= worker.is_some();
        let sweep_every = match (config.ping_interval, config.idle_timeout) {
            (Some(ping), _) => ping,
            (None, Some(idle)) => idle / 4,
            (None, None) => Duration::ZERO,
        }
        .max(Duration::from_millis(10));
        let mut ping_frame = Vec::new();
        encode_frame(OpCode::Ping, b"", None, &mut ping_frame);
        let per_ip = config.max_connections_per_ip.map(PerIp::new);
        let cluster = match &config.broker {
            None => None,
            Some(url) => {
                let link = match &worker {
                    Some(_) => None, // the master holds the link
                    None => {
                        let waker = Arc::new(mio::Waker::new(poll.registry(), BROKER)?);
                        let node = node_stats::node_id(local_addr);
                        Some(BrokerLink::start(url.clone(), &node, move || {
                            let _ = waker.wake();
                        })?)
                    }
                };
                Some(Cluster {
                    link,
                    up: false,
                    next_id: 0,
                    acks: PublishAcks::default(),
                    view: ClusterView::default(),
                })
            }
        };
        let mut server = Server {
            per_ip,
            limits: Limits {
                decoder: DecoderConfig {
                    role: Role::Server,
                    max_message_size: config.max_message_size,
                    compression: false,
                },
                max_pending_bytes: config.max_pending_bytes,
                max_head_bytes: config.max_head_bytes,
                max_body_bytes: usize::try_from(config.max_message_size).unwrap_or(usize::MAX),
                echo: config.echo,
                deflate: config.deflate,
                slow_consumer: config.slow_consumer,
            },
            gate,
            tls,
            clock: Clock::new(&clock_config, now),
            next_stats: now + config.stats_interval,
            next_node_report: now,
            node: node_stats::node_id(local_addr),
            next_sweep: (config.ping_interval.is_some() || config.idle_timeout.is_some())
                .then(|| now + sweep_every),
            sweep_every,
            ping_frame: Bytes::from(ping_frame),
            fanout_seconds: Histogram::new(DURATION_BUCKETS),
            publish_seconds: Histogram::new(DURATION_BUCKETS),
            config,
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            conns: Slab::new(),
            topics: Topics::default(),
            stats: Stats::default(),
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            inflater: Inflater::default(),
            inflated: Vec::new(),
            handshake_deadlines: VecDeque::new(),
            closing_deadlines: VecDeque::new(),
            read_again: Vec::new(),
            actions: Vec::new(),
            accept_paused_until: None,
            accepting: false,
            shutdown_deadline: None,
            worker,
            cluster,
        };
        server.set_accepting(true)?;
        // The clock's topic exists from the start: tell the cluster.
        server.interest(crate::topics::TIME, true);
        Ok(server)
    }

    /// Adds the listener to (or removes it from) the epoll set.
    ///
    /// Registered by hand rather than through mio, to use `EPOLLEXCLUSIVE`: every worker
    /// of a multi-process server waits on the same listening socket, and without it each
    /// new connection would wake all of them. Level-triggered, so a worker that stops
    /// accepting with connections still queued leaves them for the others.
    fn set_accepting(&mut self, on: bool) -> io::Result<()> {
        let Some(listener) = self.listener.as_ref() else {
            return Ok(());
        };
        if on == self.accepting {
            return Ok(());
        }
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLEXCLUSIVE) as u32,
            u64: LISTENER.0 as u64,
        };
        let op = if on {
            libc::EPOLL_CTL_ADD
        } else {
            libc::EPOLL_CTL_DEL
        };
        // SAFETY: both descriptors are open and owned by this struct; `event` is a valid
        // epoll_event. mio never sees this registration: events for it carry the
        // LISTENER token, which the loop handles.
        let rc =
            unsafe { libc::epoll_ctl(self.poll.as_raw_fd(), op, listener.as_raw_fd(), &mut event) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        self.accepting = on;
        Ok(())
    }

    /// SIGHUP: re-reads the TLS certificate and key. New connections use them; open ones
    /// keep their sessions. A file that does not load leaves the old certificate in use.
    fn reload_tls(&mut self) {
        let Some(files) = self.config.tls.as_ref() else {
            tracing::info!("SIGHUP: no TLS certificate to reload");
            return;
        };
        match crate::tls::load(files) {
            Ok(config) => {
                self.tls = Some(config);
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "TLS certificate reload failed; keeping the old one")
            }
        }
    }

    /// Upgraded connections in the whole server (all workers).
    fn total_open(&self) -> u64 {
        match &self.worker {
            None => self.stats.open as u64,
            Some(w) => {
                let others =
                    w.scoreboard.total_open() - w.scoreboard.slot(w.index).open.load(Relaxed);
                others + self.stats.open as u64
            }
        }
    }

    /// Whether a new upgrade may be accepted under `--max-connections`.
    fn has_room(&self) -> bool {
        self.config
            .max_connections
            .is_none_or(|max| self.total_open() < max)
    }

    fn serve(&mut self) -> Result<(), ServeError> {
        let mut events = Events::with_capacity(1024);
        tracing::info!(addr = %self.local_addr, "listening");
        loop {
            let timeout = self.poll_timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e.into());
            }
            let mut now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    BROKER => self.broker_events(now),
                    CONTROL => {
                        if let Err(error) = self.control_io(now) {
                            if self.shutdown_deadline.is_none() {
                                tracing::warn!(%error, "control channel to the master lost: shutting down");
                                self.begin_shutdown(now);
                            }
                        }
                    }
                    SIGNALS => {
                        let signals: Vec<i32> = self.signals.pending().collect();
                        for signal in signals {
                            if signal == SIGHUP {
                                self.reload_tls();
                            } else if self.shutdown_deadline.is_some() {
                                tracing::warn!("second signal: exiting now");
                                return Ok(());
                            } else {
                                self.begin_shutdown(now);
                            }
                        }
                    }
                    Token(key) => {
                        if event.is_readable() || event.is_read_closed() || event.is_error() {
                            self.read(key, now);
                        }
                        if event.is_writable() {
                            self.write(key);
                        }
                    }
                }
            }
            for key in std::mem::take(&mut self.read_again) {
                self.read(key, now);
            }
            // Messages for the master queued this turn (topic interest, relays).
            if self
                .worker
                .as_ref()
                .is_some_and(|w| !w.control_out.is_empty())
            {
                if let Err(error) = self.control_io(now) {
                    tracing::warn!(%error, "cannot write to the master");
                }
            }
            if self.accept_paused_until.is_some_and(|until| now >= until) {
                self.accept_paused_until = None;
            }
            self.update_accepting();
            if self.shutdown_deadline.is_none() && self.clock.due(now, self.stats.open) {
                let (stamp, frame) = self.clock.stamp();
                tracing::debug!(stamp, "broadcast");
                let time = self.topics.time();
                self.publish_to(Some(time), &frame);
                now = Instant::now();
            }
            if self.next_sweep.is_some_and(|at| now >= at) {
                self.next_sweep = Some(now + self.sweep_every);
                self.sweep(now);
            }
            self.expire(now);
            let late = self
                .cluster
                .as_mut()
                .map(|c| c.acks.expire(now))
                .unwrap_or_default();
            for finished in late {
                self.finish_cluster_publish(Some(finished), now);
            }
            self.report(now);
            if self.worker.is_some() || self.cluster.is_some() {
                self.send_node_report(now);
            }
            if let Some(deadline) = self.shutdown_deadline {
                if self.conns.is_empty() || now >= deadline {
                    tracing::info!(unfinished = self.conns.len(), "shutdown complete");
                    return Ok(());
                }
            }
        }
    }

    /// How long `poll` may sleep: until the nearest deadline of any kind.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.clock
                .deadline()
                .filter(|_| self.shutdown_deadline.is_none()),
            Some(self.next_stats),
            (self.worker.is_some() || self.cluster.is_some()).then_some(self.next_node_report),
            self.next_sweep,
            self.handshake_deadlines.front().map(|&(_, at)| at),
            self.cluster.as_ref().and_then(|c| c.acks.next_deadline()),
            self.closing_deadlines.front().map(|&(_, at)| at),
            self.accept_paused_until,
            self.shutdown_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    fn accept(&mut self, now: Instant) {
        if !self.accepting {
            return; // a level-triggered event already queued before we stopped
        }
        loop {
            if self.conns.len() >= self.config.max_sockets {
                self.update_accepting();
                return;
            }
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, peer)) => {
                    if let Err(error) = self.register(stream, peer, now) {
                        tracing::warn!(%error, "cannot register connection");
                    }
                }
                // WouldBlock: the queue is empty (or another worker took the connection).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    tracing::warn!(error = %e, open = self.conns.len(), "accept failed; pausing accepts briefly");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    self.update_accepting();
                    return;
                }
                // A connection reset before we accepted it, and the like: try the next.
                Err(_) => continue,
            }
        }
    }

    fn register(
        &mut self,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> io::Result<()> {
        stream.set_nodelay(true)?;
        if let Some(bytes) = self.config.send_buffer {
            socket2::SockRef::from(&stream).set_send_buffer_size(bytes)?;
        }
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let deadline = now + self.config.handshake_timeout;
        let session = self.tls.as_ref().map(crate::tls::session).transpose()?;
        entry.insert(Connection::new(stream, deadline, session));
        if let Some(per_ip) = self.per_ip.as_mut() {
            per_ip.add(key, peer.ip());
        }
        self.handshake_deadlines.push_back((key, deadline));
        self.stats.accepted += 1;
        Ok(())
    }

    fn read(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let before = conn.kind();
        let admit = if before != PhaseKind::Handshake {
            Admit::Yes // only an upgrade request uses it
        } else if !self.has_room() {
            Admit::ServerFull
        } else if self.per_ip.as_ref().is_some_and(|p| !p.within_limit(key)) {
            Admit::TooManyFromAddress
        } else {
            Admit::Yes
        };
        let mut actions = std::mem::take(&mut self.actions);
        let mut cx = ReadContext {
            scratch: &mut self.scratch,
            limits: &self.limits,
            gate: &self.gate,
            admit,
            closing_deadline: now + self.config.close_timeout,
            stats: &mut self.stats,
            actions: &mut actions,
            inflater: &mut self.inflater,
            inflated: &mut self.inflated,
        };
        let mut next = self.conns[key].on_readable(&mut cx);
        for action in actions.drain(..) {
            if let Next::Remove(end) = self.apply(key, action, now) {
                next = Next::Remove(end);
            }
        }
        self.actions = actions;
        self.after(key, before, next);
    }

    fn write(&mut self, key: usize) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let before = conn.kind();
        let next = conn.on_writable();
        self.after(key, before, next);
    }

    /// Does what a connection asked for after a read.
    fn apply(&mut self, key: usize, action: Action, now: Instant) -> Next {
        match action {
            Action::Joined(admission) => {
                // The same read may already have closed it (a close right behind the
                // upgrade request): then it joins nothing.
                if self.conns[key].kind() != PhaseKind::Open {
                    return Next::Keep;
                }
                for name in &admission.topics {
                    self.subscribe(key, name);
                }
                self.conns[key].set_allowed_topics(admission.allowed);
                Next::Keep
            }
            // Text that is not a JSON object is not meant as a command: no answer.
            Action::Command(text) if !commands::is_command(&text) => Next::Keep,
            Action::Command(text) => {
                let reply = self.command(key, &text);
                self.reply(key, &reply)
            }
            Action::OversizedCommand => self.reply(key, &commands::malformed_reply()),
            Action::Http(request, body) => self.http(key, request, body, now),
        }
    }

    /// Sends a command's answer to an open connection.
    fn reply(&mut self, key: usize, reply: &str) -> Next {
        match self.conns.get_mut(key) {
            Some(conn) if conn.kind() == PhaseKind::Open => {
                conn.reply(reply.as_bytes(), &self.limits)
            }
            _ => Next::Keep,
        }
    }

    /// Runs a client's command; returns the answer to send it.
    fn command(&mut self, key: usize, text: &str) -> String {
        let command = match commands::parse(text) {
            Ok(command) => command,
            Err(reply) => return reply,
        };
        let (op, name) = match &command {
            Command::Subscribe(name) => ("subscribe", name.as_str()),
            Command::Unsubscribe(name) => ("unsubscribe", name.as_str()),
        };
        let error = |e: &str| commands::error_reply(Some(op), Some(name), e);
        if let Err(e) = validate_name(name) {
            return error(&e);
        }
        let conn = &self.conns[key];
        match command {
            Command::Subscribe(_) => {
                if !conn.may_join(name) {
                    return error("forbidden");
                }
                let already = self
                    .topics
                    .id(name)
                    .is_some_and(|id| conn.is_subscribed(id));
                if !already {
                    if conn.subscription_count() >= self.config.max_topics_per_connection {
                        return error(&format!(
                            "at most {} topics per connection",
                            self.config.max_topics_per_connection
                        ));
                    }
                    self.subscribe(key, name);
                }
            }
            Command::Unsubscribe(_) => {
                if let Some(id) = self.topics.id(name) {
                    self.unsubscribe(key, id);
                }
            }
        }
        commands::ok_reply(op, name)
    }

    fn subscribe(&mut self, key: usize, name: &str) {
        if self.topics.id(name).is_none() {
            self.interest(name, true);
        }
        let id = self.topics.get_or_create(name);
        let sub = self.topics.add(id, key);
        self.conns[key].add_subscription(sub);
    }

    fn unsubscribe(&mut self, key: usize, topic: TopicId) {
        let Some(sub) = self.conns[key].take_subscription(topic) else {
            return;
        };
        let name = self.topics.name(topic).to_string();
        if let Some(moved) = self.topics.remove(sub) {
            self.conns[moved].move_subscription(sub.topic, sub.position);
        }
        if self.topics.id(&name).is_none() {
            self.interest(&name, false); // its last local subscriber left
        }
    }

    /// Tells the cluster that this process has (or no longer has) subscribers of `topic`:
    /// the broker link subscribes to a topic only while some node process has them.
    fn interest(&mut self, topic: &str, on: bool) {
        if self.cluster.is_none() {
            return;
        }
        if let Some(worker) = self.worker.as_mut() {
            Message::Interest {
                topic: topic.to_string(),
                on,
            }
            .encode(&mut worker.control_out);
            return;
        }
        if let Some(link) = self.cluster.as_ref().and_then(|c| c.link.as_ref()) {
            let topic = topic.to_string();
            link.send(if on {
                broker::Command::Subscribe(topic)
            } else {
                broker::Command::Unsubscribe(topic)
            });
        }
    }

    /// What the broker link reported (single-process server).
    fn broker_events(&mut self, now: Instant) {
        loop {
            let Some(event) = self
                .cluster
                .as_ref()
                .and_then(|c| c.link.as_ref())
                .and_then(|link| link.next_event())
            else {
                return;
            };
            match event {
                broker::Event::Message {
                    topic,
                    frame,
                    reply,
                } => {
                    let delivered = self.deliver(&topic, frame);
                    if let Some(link) = self.cluster.as_ref().and_then(|c| c.link.as_ref()) {
                        link.send(broker::Command::Ack { reply, delivered });
                    }
                }
                broker::Event::Published { id, ok } => {
                    let finished = self.cluster.as_mut().and_then(|c| c.acks.confirmed(id, ok));
                    self.finish_cluster_publish(finished, now);
                }
                broker::Event::Ack {
                    id,
                    node,
                    delivered,
                } => {
                    let finished = self
                        .cluster
                        .as_mut()
                        .and_then(|c| c.acks.ack(id, node, delivered));
                    self.finish_cluster_publish(finished, now);
                }
                broker::Event::Report(report) => {
                    if let Some(cluster) = self.cluster.as_mut() {
                        if let Err(error) = cluster.view.record(&report, now) {
                            tracing::warn!(%error, "ignoring a node report from the broker");
                        }
                    }
                }
                broker::Event::Up(up) => self.set_broker_up(up),
            }
        }
    }

    /// Answers a publish through the cluster that is over (see `publish_acks`).
    fn finish_cluster_publish(&mut self, finished: Option<Finished<Waiting>>, now: Instant) {
        match finished {
            None => {}
            Some(Finished::Refused(waiting)) => self.answer_publish(waiting, REFUSED, now),
            Some(Finished::Delivered(waiting, body)) => {
                let response = http::json_response(200, "OK", &body);
                if self.answer_waiting(&waiting, response, now) {
                    self.publish_seconds
                        .observe(now.saturating_duration_since(waiting.started));
                }
            }
        }
    }

    fn set_broker_up(&mut self, up: bool) {
        if let Some(cluster) = self.cluster.as_mut() {
            if cluster.up != up {
                tracing::info!(up, "broker link");
            }
            cluster.up = up;
        }
    }

    /// Answers a publish that waited for the master or the broker.
    fn answer_publish(&mut self, waiting: Waiting, count: u64, now: Instant) {
        let topic = waiting.topic.as_deref().unwrap_or(ALL_CONNECTIONS);
        let response = match count {
            REFUSED => broker_refusal(),
            count => http::published(topic, count),
        };
        if self.answer_waiting(&waiting, response, now) {
            self.publish_seconds
                .observe(now.saturating_duration_since(waiting.started));
        }
    }

    /// Sends `response` to the client of a request that waited, if it is still there
    /// (it may have gone away or timed out meanwhile). Returns whether it was.
    fn answer_waiting(&mut self, waiting: &Waiting, response: Vec<u8>, now: Instant) -> bool {
        let key = waiting.key;
        let same = self
            .conns
            .get(key)
            .is_some_and(|c| c.kind() == PhaseKind::Http && c.deadline() == waiting.deadline);
        if !same {
            return false;
        }
        let next = self.answer_http(key, response, waiting.keep_alive, now);
        self.after(key, PhaseKind::Http, next);
        true
    }

    /// Sends an HTTP answer on connection `key`, keeping the connection for the next
    /// request when the client asked (see `Connection::answer_http`); a kept connection
    /// waits for it under the handshake timeout.
    fn answer_http(
        &mut self,
        key: usize,
        response: Vec<u8>,
        keep_alive: bool,
        now: Instant,
    ) -> Next {
        let idle = now + self.config.handshake_timeout;
        let closing = now + self.config.close_timeout;
        let next = self.conns[key].answer_http(response, keep_alive, idle, closing, &self.limits);
        if self
            .conns
            .get(key)
            .is_some_and(|c| c.kind() == PhaseKind::Handshake)
        {
            self.handshake_deadlines.push_back((key, idle));
        }
        next
    }

    /// This process's numbers for `GET /stats` (a single-process server: the node's).
    fn node_report(&self) -> NodeReport {
        NodeReport {
            node: self.node.clone(),
            connections: self.stats.open as u64,
            workers: 1,
            messages_out: self.stats.frames_out,
            last_fanout_us: self.stats.last_fanout.as_micros() as u64,
            rss_bytes: rss_bytes().unwrap_or(0),
            counts: self.topic_counts(),
        }
    }

    fn topic_counts(&self) -> TopicCounts {
        TopicCounts::largest(self.topics.subscriber_counts())
    }

    /// Every `REPORT_EVERY`: a worker sends its topic counts to the master; a
    /// single-process node in a cluster publishes its report on the broker.
    fn send_node_report(&mut self, now: Instant) {
        if now < self.next_node_report {
            return;
        }
        self.next_node_report = now + node_stats::REPORT_EVERY;
        if self.worker.is_some() {
            let json = serde_json::to_vec(&self.topic_counts()).unwrap_or_default();
            if let Some(worker) = self.worker.as_mut() {
                Message::TopicCounts { json }.encode(&mut worker.control_out);
            }
        } else if let Some(link) = self.cluster.as_ref().and_then(|c| c.link.as_ref()) {
            let report = serde_json::to_vec(&self.node_report()).unwrap_or_default();
            link.send(broker::Command::Report(report));
        }
    }

    fn unsubscribe_all(&mut self, key: usize) {
        let topics: Vec<TopicId> = self.conns[key].subscriptions().map(|s| s.topic).collect();
        for topic in topics {
            self.unsubscribe(key, topic);
        }
    }

    /// Answers a plain HTTP request (or, for a publish in a worker, relays it first).
    fn http(
        &mut self,
        key: usize,
        request: c1m_proto::handshake::PlainRequest,
        body: Vec<u8>,
        now: Instant,
    ) -> Next {
        let keep_alive = request.keep_alive;
        let ready = self.shutdown_deadline.is_none()
            && self.has_room()
            && self.cluster.as_ref().is_none_or(|c| c.up);
        let render = || self.render_metrics();
        let cx = http::Context {
            api_key: self.config.api_key.as_deref(),
            ready,
            metrics: &render,
        };
        let outcome = http::route(&request, &body, &cx);
        let response = match outcome {
            Outcome::Respond(response) => response,
            Outcome::Stats { cluster } => {
                if let Some(worker) = self.worker.as_mut() {
                    // The master sums the workers (and holds the cluster view).
                    let request = worker.next_request;
                    worker.next_request = worker.next_request.wrapping_add(1);
                    let waiting = Waiting::new(&self.conns[key], key, keep_alive, None, now);
                    worker.waiting.insert(request, waiting);
                    Message::StatsRequest { request, cluster }.encode(&mut worker.control_out);
                    return Next::Keep; // answered when the master does
                }
                let local = self.node_report();
                let view = self.cluster.as_mut().map(|c| (&mut c.view, c.up));
                let (status, body) = node_stats::answer(&local, cluster, view, now);
                json_answer(status, &body)
            }
            Outcome::Publish { .. } if self.cluster.as_ref().is_some_and(|c| !c.up) => {
                broker_refusal()
            }
            Outcome::Publish { topic, frame }
                if self.worker.is_none() && self.cluster.is_some() =>
            {
                let waiting = Waiting::new(&self.conns[key], key, keep_alive, Some(&topic), now);
                let cluster = self.cluster.as_mut().expect("checked above");
                let id = cluster.next_id;
                cluster.next_id += 1;
                let local_has = topic == ALL_CONNECTIONS
                    || self
                        .topics
                        .id(&topic)
                        .is_some_and(|t| !self.topics.subscribers(t).is_empty());
                let expected = cluster.view.nodes_with(&topic, &self.node, local_has, now);
                cluster.acks.start(id, waiting, &topic, expected, now);
                if let Some(link) = cluster.link.as_ref() {
                    link.send(broker::Command::Publish {
                        id,
                        topic,
                        frame: frame.to_vec(),
                    });
                }
                return Next::Keep; // answered when the broker confirms and the nodes count
            }
            Outcome::Publish { topic, frame } => {
                if let Some(worker) = self.worker.as_mut() {
                    let request = worker.next_request;
                    worker.next_request = worker.next_request.wrapping_add(1);
                    let waiting =
                        Waiting::new(&self.conns[key], key, keep_alive, Some(&topic), now);
                    worker.waiting.insert(request, waiting);
                    Message::Relay {
                        request,
                        topic,
                        frame: frame.to_vec(),
                    }
                    .encode(&mut worker.control_out);
                    if let Err(error) = self.control_io(now) {
                        tracing::warn!(%error, "cannot relay a publish to the master");
                    }
                    return Next::Keep; // answered when the master reports the count
                }
                let delivered = self.publish_named(&topic, &frame);
                self.publish_seconds.observe(now.elapsed());
                http::published(&topic, delivered)
            }
        };
        self.answer_http(key, response, keep_alive, now)
    }

    fn render_metrics(&self) -> String {
        metrics::render(&metrics::View {
            stats: &self.stats,
            topics: self.topics.summary(),
            fanout: &self.fanout_seconds,
            publish: &self.publish_seconds,
            rss_bytes: rss_bytes().unwrap_or(0),
            worker: self.worker.as_ref().map(|w| (w.index, &w.scoreboard)),
            broker_up: self.cluster.as_ref().map(|c| c.up),
        })
    }

    /// Bookkeeping after a connection handled an event: phase counters, topics,
    /// deadlines, removal.
    fn after(&mut self, key: usize, before: PhaseKind, next: Next) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let after = conn.kind();
        // Count phase changes first, even for a connection about to be removed: one read
        // can upgrade a connection and then find EOF, and `remove` uncounts open ones.
        if before != after && after == PhaseKind::Open {
            self.stats.open += 1;
        }
        if before == PhaseKind::Open && after != PhaseKind::Open {
            self.stats.open -= 1;
        }
        match next {
            Next::Remove(end) => return self.remove(key, end),
            Next::ReadAgain => self.read_again.push(key),
            Next::Keep => {}
        }
        if before == after {
            return;
        }
        if after != PhaseKind::Open {
            // Only open connections are in topics (invariant of `Topics`).
            self.unsubscribe_all(key);
        }
        if after == PhaseKind::Closing {
            let conn = &mut self.conns[key];
            conn.settle_closing();
            if let Some(deadline) = conn.deadline() {
                self.closing_deadlines.push_back((key, deadline));
            }
        }
    }

    fn remove(&mut self, key: usize, end: End) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.kind() == PhaseKind::Open {
            self.stats.open -= 1;
        }
        self.unsubscribe_all(key);
        if let Some(per_ip) = self.per_ip.as_mut() {
            per_ip.remove(key);
        }
        match end {
            End::SlowConsumer => self.stats.slow_consumers += 1,
            End::Io => self.stats.io_errors += 1,
            End::PeerClosed => self.stats.peer_closed += 1,
        }
        let mut conn = self.conns.remove(key);
        let _ = self.poll.registry().deregister(conn.stream_mut());
    }

    /// Fans out a publication that came from the master or the broker, unless shutting
    /// down (the clients are being closed). Returns how many connections it reached.
    fn deliver(&mut self, topic: &str, frame: Vec<u8>) -> u64 {
        if self.shutdown_deadline.is_some() {
            return 0;
        }
        self.publish_named(topic, &Bytes::from(frame))
    }

    /// Publishes to a topic by name (`ALL_CONNECTIONS`: to every open connection).
    /// Returns how many connections it reached; an unknown topic reaches none.
    fn publish_named(&mut self, topic: &str, frame: &Bytes) -> u64 {
        if topic == ALL_CONNECTIONS {
            return self.publish_to(None, frame);
        }
        match self.topics.id(topic) {
            Some(id) => self.publish_to(Some(id), frame),
            None => 0,
        }
    }

    /// The hot path: hand one shared, already-encoded frame to every subscriber of
    /// `topic` (every open connection for `None`). Returns how many it reached.
    /// Connections that negotiated permessage-deflate get the frame compressed, once
    /// for all of them with the same window size, on the first such connection met.
    fn publish_to(&mut self, topic: Option<TopicId>, frame: &Bytes) -> u64 {
        let started = Instant::now();
        let mut sent = 0u64;
        let mut failed: Vec<(usize, End)> = Vec::new();
        let skip_every = self.config.faults.skip_every.unwrap_or(0);
        let mut seen = 0usize;
        let conns = &mut self.conns;
        let limits = &self.limits;
        let stats = &mut self.stats;
        // One compressed frame per server window size (9 to 15 bits) in use.
        let mut compressed: [Option<Bytes>; 7] = Default::default();
        let mut deliver = |key: usize, conn: &mut Connection| {
            seen += 1;
            if skip_every > 0 && seen.is_multiple_of(skip_every) {
                return; // test fault: see `Faults`
            }
            let bytes = match conn.deflate_window() {
                Some(bits) => compressed[usize::from(bits - 9)]
                    .get_or_insert_with(|| compress_frame(frame, bits)),
                None => frame,
            };
            match conn.send(bytes, limits) {
                Ok(()) => sent += 1,
                Err(SendError::Overflow) if limits.slow_consumer == SlowConsumerPolicy::Drop => {
                    stats.dropped += 1;
                }
                Err(SendError::Overflow) => failed.push((key, End::SlowConsumer)),
                Err(SendError::Io(_)) => failed.push((key, End::Io)),
            }
        };
        match topic {
            Some(id) => {
                self.topics.count_published(id);
                for &key in self.topics.subscribers(id) {
                    deliver(key as usize, &mut conns[key as usize]);
                }
            }
            None => {
                for (key, conn) in conns.iter_mut() {
                    if conn.kind() == PhaseKind::Open {
                        deliver(key, conn);
                    }
                }
            }
        }
        let fanout = started.elapsed();
        for (key, end) in failed {
            self.end_connection(key, end);
        }
        self.stats.broadcasts += 1;
        self.stats.frames_out += sent;
        self.stats.bytes_out += sent * frame.len() as u64;
        self.stats.last_fanout = fanout;
        self.fanout_seconds.observe(fanout);
        tracing::debug!(sent, fanout_ms = fanout.as_secs_f64() * 1e3, "fan-out done");
        sent
    }

    /// Ends an open connection that failed during a fan-out: a slow consumer is told
    /// why with close code 1008 (its close frame waits behind the queued output, and
    /// the close timeout bounds the wait); a broken socket is dropped.
    fn end_connection(&mut self, key: usize, end: End) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if end != End::SlowConsumer || conn.kind() != PhaseKind::Open {
            return self.remove(key, end);
        }
        self.stats.slow_consumers += 1;
        let deadline = Instant::now() + self.config.close_timeout;
        let next = conn.begin_close(
            CloseCode::POLICY,
            "slow consumer: output queue full",
            deadline,
            &self.limits,
        );
        self.after(key, PhaseKind::Open, next);
    }

    /// The idle sweep, every `--ping-interval` (or a quarter of `--idle-timeout`): a
    /// connection heard from since the last sweep is fine; a silent one gets a ping,
    /// and one silent for `--idle-timeout` is closed with 1001. One pass over the slab
    /// replaces a timer per connection; the ping frame is encoded once and shared.
    fn sweep(&mut self, now: Instant) {
        let limit = self.config.idle_timeout.map(|idle| {
            let sweeps = idle.as_secs_f64() / self.sweep_every.as_secs_f64();
            sweeps.ceil().clamp(1.0, u8::MAX as f64) as u8
        });
        let ping = self.config.ping_interval.is_some();
        let mut idle = Vec::new();
        let mut failed = Vec::new();
        let mut pings = 0u64;
        for (key, conn) in self.conns.iter_mut() {
            if conn.kind() != PhaseKind::Open {
                continue;
            }
            let silent = conn.sweep();
            if silent == 0 {
                continue;
            }
            if limit.is_some_and(|limit| silent >= limit) {
                idle.push(key);
            } else if ping {
                match conn.send(&self.ping_frame, &self.limits) {
                    Ok(()) => pings += 1,
                    Err(SendError::Overflow) => {} // it has output queued: no ping needed
                    Err(SendError::Io(_)) => failed.push(key),
                }
            }
        }
        for key in failed {
            self.remove(key, End::Io);
        }
        let deadline = now + self.config.close_timeout;
        for key in &idle {
            let next = self.conns[*key].begin_close(
                CloseCode::GOING_AWAY,
                "idle timeout",
                deadline,
                &self.limits,
            );
            self.after(*key, PhaseKind::Open, next);
        }
        self.stats.idle_timeouts += idle.len() as u64;
        tracing::debug!(pings, idle = idle.len(), "idle sweep");
    }

    /// Reads messages from the master and writes queued ones to it.
    fn control_io(&mut self, now: Instant) -> io::Result<()> {
        let Some(worker) = self.worker.as_mut() else {
            return Ok(());
        };
        write_queued(&mut worker.control, &mut worker.control_out)?;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match worker.control.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => worker.control_in.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let messages = Message::decode_all(&mut worker.control_in)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let had_output = !messages.is_empty();
        for message in messages {
            self.on_control(message, now);
        }
        if had_output {
            if let Some(worker) = self.worker.as_mut() {
                write_queued(&mut worker.control, &mut worker.control_out)?;
            }
        }
        Ok(())
    }

    fn on_control(&mut self, message: Message, now: Instant) {
        match message {
            Message::Publish {
                origin,
                request,
                topic,
                frame,
            } => {
                let count = self.deliver(&topic, frame);
                if origin != NO_ORIGIN {
                    if let Some(worker) = self.worker.as_mut() {
                        Message::Delivered {
                            origin,
                            request,
                            count,
                        }
                        .encode(&mut worker.control_out);
                    }
                }
            }
            Message::Done { request, count } => {
                let waiting = self
                    .worker
                    .as_mut()
                    .and_then(|w| w.waiting.remove(&request));
                if let Some(waiting) = waiting {
                    self.answer_publish(waiting, count, now);
                }
            }
            Message::Answer {
                request,
                status,
                json,
            } => {
                let waiting = self
                    .worker
                    .as_mut()
                    .and_then(|w| w.waiting.remove(&request));
                if let Some(waiting) = waiting {
                    let body = serde_json::from_slice(&json).unwrap_or_default();
                    let answered = self.answer_waiting(&waiting, json_answer(status, &body), now);
                    if answered && waiting.topic.is_some() {
                        self.publish_seconds
                            .observe(now.saturating_duration_since(waiting.started));
                    }
                }
            }
            Message::BrokerUp { up } => self.set_broker_up(up),
            Message::Relay { .. }
            | Message::Delivered { .. }
            | Message::Interest { .. }
            | Message::TopicCounts { .. }
            | Message::StatsRequest { .. } => {
                tracing::warn!("unexpected control message from the master");
            }
        }
    }

    /// Takes the listener out of the epoll set while this process cannot take more
    /// connections, and puts it back when it can.
    fn update_accepting(&mut self) {
        let want = self.shutdown_deadline.is_none()
            && self.accept_paused_until.is_none()
            && self.conns.len() < self.config.max_sockets;
        if let Err(error) = self.set_accepting(want) {
            tracing::warn!(%error, "cannot change the listener registration");
        }
    }

    /// Publishes counters: to the scoreboard (a worker, every loop turn: the master's
    /// gate and every worker's `--max-connections` check read it), or as a stats line.
    fn report(&mut self, now: Instant) {
        let due = now >= self.next_stats;
        if due {
            self.next_stats = now + self.config.stats_interval;
        }
        let s = &self.stats;
        match &self.worker {
            None if due => self.stats.report(now, self.conns.len()),
            None => {}
            Some(w) => {
                let slot = w.scoreboard.slot(w.index);
                slot.open.store(s.open as u64, Relaxed);
                slot.other_sockets
                    .store((self.conns.len() - s.open) as u64, Relaxed);
                slot.frames_out.store(s.frames_out, Relaxed);
                slot.broadcasts.store(s.broadcasts, Relaxed);
                slot.last_fanout_us
                    .store(s.last_fanout.as_micros() as u64, Relaxed);
                slot.rejected_full.store(s.rejected_full, Relaxed);
                slot.accepted.store(s.accepted, Relaxed);
                slot.bytes_out.store(s.bytes_out, Relaxed);
                slot.messages_in.store(s.messages_in, Relaxed);
                slot.dropped.store(s.dropped, Relaxed);
                slot.handshake_rejects.store(s.handshake_rejects, Relaxed);
                slot.peer_closed.store(s.peer_closed, Relaxed);
                slot.io_errors.store(s.io_errors, Relaxed);
                slot.protocol_errors.store(s.protocol_errors, Relaxed);
                slot.slow_consumers.store(s.slow_consumers, Relaxed);
                slot.idle_timeouts.store(s.idle_timeouts, Relaxed);
                slot.handshake_timeouts.store(s.handshake_timeouts, Relaxed);
                slot.rejected_per_ip.store(s.rejected_per_ip, Relaxed);
                if due || slot.rss_bytes.load(Relaxed) == 0 {
                    slot.rss_bytes.store(rss_bytes().unwrap_or(0), Relaxed);
                }
            }
        }
    }

    /// Closes connections whose handshake, HTTP answer or close handshake took too
    /// long.
    ///
    /// Entries whose connection has moved on (upgraded, closed, or its slot reused) are
    /// dropped from the front as soon as they are seen, not when their deadline comes:
    /// under heavy churn the queues would otherwise hold one entry per connection accepted
    /// in the last `--handshake-timeout`.
    fn expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        pop_expired(
            &mut self.handshake_deadlines,
            &self.conns,
            &[PhaseKind::Handshake, PhaseKind::Http],
            now,
            &mut expired,
        );
        self.stats.handshake_timeouts += expired.len() as u64;
        for key in expired.drain(..) {
            self.remove(key, End::PeerClosed);
        }
        pop_expired(
            &mut self.closing_deadlines,
            &self.conns,
            &[PhaseKind::Closing],
            now,
            &mut expired,
        );
        for key in expired {
            self.remove(key, End::PeerClosed);
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        tracing::info!(
            open = self.stats.open,
            "shutting down: closing every connection with 1001"
        );
        let _ = self.set_accepting(false);
        self.listener = None;
        let deadline = now + self.config.close_timeout;
        self.shutdown_deadline = Some(deadline);
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            let conn = &mut self.conns[key];
            let before = conn.kind();
            let next = match before {
                PhaseKind::Open => conn.begin_close(
                    CloseCode::GOING_AWAY,
                    "server shutting down",
                    deadline,
                    &self.limits,
                ),
                PhaseKind::Handshake | PhaseKind::Http => Next::Remove(End::PeerClosed),
                PhaseKind::Closing => Next::Keep,
            };
            self.after(key, before, next);
        }
    }
}

/// An HTTP answer the master composed (`GET /stats`, a publish through the cluster).
pub(crate) fn json_answer(status: u16, body: &serde_json::Value) -> Vec<u8> {
    let reason = if status == 200 {
        "OK"
    } else {
        "Service Unavailable"
    };
    http::json_response(status, reason, body)
}

/// The answer to a publish the cluster's broker did not take.
fn broker_refusal() -> Vec<u8> {
    http::json_response(
        503,
        "Service Unavailable",
        &serde_json::json!({ "error": "the broker is unavailable: the message was not published" }),
    )
}

/// The permessage-deflate version of a broadcast frame: its payload compressed, RSV1
/// set; the frame itself when compression would not make it smaller (allowed: RSV1 is
/// per message).
fn compress_frame(frame: &Bytes, window_bits: u8) -> Bytes {
    let Some((opcode, payload)) = split_frame(frame) else {
        return frame.clone();
    };
    let compressed = deflate::compress_with_window(payload, window_bits);
    if compressed.len() >= payload.len() {
        return frame.clone();
    }
    let mut out = Vec::with_capacity(compressed.len() + 10);
    encode_compressed_frame(opcode, &compressed, None, &mut out);
    Bytes::from(out)
}

/// A non-blocking listening socket with the backlog we ask for. (`std`'s and tokio's
/// `bind` use a fixed backlog of 128 or 1024, which throttles a fast ramp-up.)
pub(crate) fn listen_socket(
    addr: SocketAddr,
    backlog: i32,
    reuse_port: bool,
) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Pops the front of a deadline queue of connections in one of the phases `kinds`: entries whose
/// connection has moved on (left the phase, or its slot was reused with another deadline)
/// at once, live ones once due, whose keys go to `expired`.
fn pop_expired(
    queue: &mut VecDeque<(usize, Instant)>,
    conns: &Slab<Connection>,
    kinds: &[PhaseKind],
    now: Instant,
    expired: &mut Vec<usize>,
) {
    while let Some(&(key, deadline)) = queue.front() {
        let waiting = conns
            .get(key)
            .is_some_and(|c| kinds.contains(&c.kind()) && c.deadline() == Some(deadline));
        if waiting && deadline > now {
            break;
        }
        queue.pop_front();
        if waiting {
            expired.push(key);
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
