//! The event loop of one server process: what wakes it, and who handles each wake-up.
//!
//! One `mio::Poll` (epoll, edge-triggered) drives everything on one thread. Each
//! socket is registered once for both readable and writable readiness; with edge
//! triggering an idle connection costs no wake-ups, and a writable event only arrives
//! after a write came back short. The work itself lives elsewhere:
//! - accepting: [`Acceptor`] (`listener.rs`);
//! - connections and everything indexed by them (topics, deadlines, per-address
//!   counts, token expiry): [`Registry`] (`registry.rs`);
//! - reading a connection, its commands and HTTP requests: `server/requests.rs`;
//! - publications from the master or the broker, and requests waiting for them:
//!   `server/upstream_events.rs`, over [`Upstream`] (`upstream.rs`);
//! - the fan-out: `server/delivery.rs` (the one entry point, and the test faults),
//!   over `fanout.rs`;
//! - counters, `/metrics`, node reports: `server/observe.rs`.
//!
//! Shutdown protocol: SIGINT/SIGTERM stops accepting, sends close 1001 to every open
//! connection (4200, "reconnect", to Pusher clients) and waits up to `close_timeout` for
//! the close handshakes; a second signal exits at once. A worker whose control channel to the master closes does the same.

mod cluster_resume;
mod delivery;
mod observe;
mod pusher_clients;
mod pusher_presence;
mod pusher_webhooks;
mod requests;
mod resume;
mod upstream_events;

use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use c1m_proto::deflate::Inflater;
use c1m_proto::{encode_frame, DecoderConfig, OpCode, Role};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::admission::AcceptRate;
use crate::app_connections::AppConnections;
use crate::auth::{AuthConfigError, Gate};
use crate::clock::Clock;
use crate::cluster::ClusterNode;
use crate::config::ServeConfig;
use crate::connection::{Action, Limits};
use crate::history::History;
use crate::listener::{listen_socket, Accepted, Acceptor};
use crate::metrics::{Histogram, DURATION_BUCKETS};
use crate::node_stats;
use crate::per_ip::PerIp;
use crate::registry::Registry;
use crate::scoreboard::Scoreboard;
use crate::target::Target;
use crate::tickets::{SharedTicketer, TicketKey};
use crate::upstream::{MasterLink, Upstream};
use delivery::WhenDelivered;

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const CONTROL: Token = Token(usize::MAX - 3);
const BROKER: Token = Token(usize::MAX - 4);

/// The worker's read buffer, shared by all its connections (see `connection`).
/// Sockets a worker may hold past the mean of the node's workers and still accept
/// (see `Server::within_fair_share`): enough that workers do not leave and rejoin
/// the listener at every accept.
const FAIR_SHARE_SLACK: u64 = 64;
const SCRATCH_BYTES: usize = 64 * 1024;

/// How often connections' token expiry times are checked (with `--jwt-*`).
const HISTORY_EXPIRY_EVERY: Duration = Duration::from_secs(1);
const TOKEN_CHECK_EVERY: Duration = Duration::from_secs(1);

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
    /// Messages to and from the master (see `control`).
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

/// Buffers every read of this process shares, and the permessage-deflate inflater
/// (each message is inflated whole, once it has arrived: no context takeover).
struct ReadBuffers {
    scratch: Box<[u8]>,
    inflater: Inflater,
    inflated: Vec<u8>,
    /// What a connection hands back after a read.
    actions: Vec<Action>,
}

/// The periodic work of the loop, and when each is next due.
struct Timers {
    next_stats: Instant,
    /// The idle sweep (`--ping-interval`, `--idle-timeout`, event stream heartbeats):
    /// next run and period.
    next_sweep: Instant,
    sweep_every: Duration,
    /// Token expiry checks, with `--jwt-*`.
    next_token_check: Option<Instant>,
    /// Dropping topic history past its age limit, with `--history-ttl`.
    next_history_expiry: Option<Instant>,
}

struct Server {
    config: ServeConfig,
    poll: Poll,
    signals: Signals,
    local_addr: SocketAddr,
    acceptor: Acceptor,
    registry: Registry,
    gate: Gate,
    /// The TLS configuration of a `wss://` server (replaced on SIGHUP).
    tls: Option<Arc<rustls::ServerConfig>>,
    /// Seals session tickets with the node's key (kept across SIGHUP reloads).
    ticketer: Arc<SharedTicketer>,
    upstream: Upstream,
    clock: Clock,
    buffers: ReadBuffers,
    timers: Timers,
    ping_frame: Bytes,
    fanout_seconds: Histogram,
    publish_seconds: Histogram,
    /// This node's name in cluster reports (see `node_stats::node_id`).
    node: String,
    /// `--max-accept-rate`, shared with the other workers through the scoreboard.
    accept_rate: Option<AcceptRate>,
    /// Topic history, kept by the process that orders publications: a single process
    /// without `--broker` (see `history`).
    history: Option<History>,
    /// A worker: the position of the latest publication its master sent, per topic with
    /// history, to notice publications the master had to skip (`server/resume.rs`).
    relayed: std::collections::HashMap<String, crate::history::Position>,
    /// A single process in a cluster: its copy of the broker's history and the
    /// resumes waiting for the broker, by resume request (`server/cluster_resume.rs`).
    copy: crate::cluster_copy::ClusterCopy<u32>,
    /// A single process in a cluster: `GET /history` requests waiting for the broker.
    history_reads: crate::cluster_copy::HistoryReads<crate::upstream::Waiting>,
    /// Publications being fanned out and waiting (`server/delivery.rs`).
    publications: delivery::Publications,
    /// This process stopped reading its master's channel or the broker's events
    /// because `publications` was full; read again once it has room.
    upstream_paused: bool,
    /// Presence members of the node, when this process keeps them (a single process;
    /// a worker's master keeps them for it). See `server/pusher_clients.rs`.
    presence: Option<crate::presence::Presence>,
    /// Each Pusher app's webhooks (by app number; `None`: the app has none), sent by
    /// this process (a single process; a worker's master sends its node's).
    webhooks: crate::webhooks::AppWebhooks,
    /// Each sending connection's client event bucket (the rate limit): when it was
    /// last used and the tokens left then.
    client_event_budget: std::collections::HashMap<usize, (Instant, f32)>,
    /// Test fault `--fault-skip-source`: slab keys of connections from that address.
    muted: HashSet<usize>,
    shutdown_deadline: Option<Instant>,
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
        let node = node_stats::node_id(local_addr);
        let cluster = config.broker.is_some();
        let (upstream, per_ip, accept_rate) = match role {
            Some(role) => {
                role.control.set_nonblocking(true)?;
                let mut control = mio::net::UnixStream::from_std(role.control);
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
                let scoreboard = Arc::new(role.scoreboard);
                let per_ip = config
                    .max_connections_per_ip
                    .map(|limit| PerIp::shared(limit, Arc::clone(&scoreboard), role.index));
                let accept_rate = config
                    .max_accept_rate
                    .map(|rate| AcceptRate::shared(rate, Arc::clone(&scoreboard)));
                let mut link = MasterLink::new(role.index, scoreboard, control, cluster);
                link.share_interest = config.pusher_apps.iter().any(|a| a.webhook.is_some());
                (Upstream::ViaMaster(link), per_ip, accept_rate)
            }
            None => {
                let per_ip = config.max_connections_per_ip.map(PerIp::new);
                let upstream = match &config.broker {
                    None => Upstream::Local,
                    Some(url) => Upstream::ViaBroker(ClusterNode::start(
                        url.clone(),
                        node.clone(),
                        config.history.enabled().then(|| config.history.clone()),
                        poll.registry(),
                        BROKER,
                    )?),
                };
                (
                    upstream,
                    per_ip,
                    config.max_accept_rate.map(AcceptRate::new),
                )
            }
        };
        // A worker seals tickets with its master's key, so that any worker resumes them.
        let ticket_key = match &upstream {
            Upstream::ViaMaster(link) => link.scoreboard.ticket_key(),
            _ => None,
        };
        let ticketer = Arc::new(SharedTicketer::new(
            ticket_key.unwrap_or_else(TicketKey::fresh),
        ));
        let tls = config
            .tls
            .as_ref()
            .map(|files| crate::tls::load(files, &ticketer))
            .transpose()?;
        let gate = Gate::new(
            config.allowed_origins.clone(),
            config.jwt.as_ref(),
            config.max_topics_per_connection,
        )?
        .with_pusher_apps(&config.pusher_apps);
        let now = Instant::now();
        // A worker's master keeps its node's presence members and sends its webhooks.
        let keeps_presence = !matches!(upstream, Upstream::ViaMaster(_));
        let webhooks = if keeps_presence {
            crate::webhooks::AppWebhooks::for_apps(&config.pusher_apps)?
        } else {
            Default::default()
        };
        let mut upstream = upstream;
        if let Upstream::ViaBroker(cluster) = &mut upstream {
            if webhooks.any() {
                cluster.share_occupancy();
            }
        }
        let mut clock_config = config.clone();
        // A worker broadcasts what its master sends; only a single process keeps time.
        clock_config.connect_only |= matches!(upstream, Upstream::ViaMaster(_));
        let sweep_every = match (config.ping_interval, config.idle_timeout) {
            (Some(ping), _) => ping,
            (None, Some(idle)) => idle / 4,
            // Event streams get a heartbeat even when WebSocket clients get no ping.
            (None, None) => crate::sse::HEARTBEAT_EVERY,
        }
        .max(Duration::from_millis(10));
        let mut ping_frame = Vec::new();
        encode_frame(OpCode::Ping, b"", None, &mut ping_frame);
        let limits = Limits {
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
        };
        // A single process keeps the history (in a cluster, its copy of what the broker
        // keeps); a worker asks its master.
        let history = (config.history.enabled() && !matches!(upstream, Upstream::ViaMaster(_)))
            .then(|| History::new(config.history.clone()));
        let mut server = Server {
            registry: Registry::new(
                limits,
                config.handshake_timeout,
                config.close_timeout,
                per_ip,
            ),
            acceptor: Acceptor::new(listener, LISTENER),
            gate,
            tls,
            ticketer,
            clock: Clock::new(&clock_config, now),
            timers: Timers {
                next_stats: now + config.stats_interval,
                next_sweep: now + sweep_every,
                sweep_every,
                next_token_check: config.jwt.is_some().then(|| now + TOKEN_CHECK_EVERY),
                next_history_expiry: history.as_ref().map(|_| now + HISTORY_EXPIRY_EVERY),
            },
            ping_frame: Bytes::from(ping_frame),
            fanout_seconds: Histogram::new(DURATION_BUCKETS),
            publish_seconds: Histogram::new(DURATION_BUCKETS),
            buffers: ReadBuffers {
                scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
                inflater: Inflater::default(),
                inflated: Vec::new(),
                actions: Vec::new(),
            },
            node,
            config,
            poll,
            local_addr,
            signals,
            upstream,
            accept_rate,
            muted: HashSet::new(),
            presence: keeps_presence.then(crate::presence::Presence::default),
            webhooks,
            client_event_budget: Default::default(),
            history,
            relayed: Default::default(),
            copy: Default::default(),
            history_reads: Default::default(),
            publications: delivery::Publications::default(),
            upstream_paused: false,
            shutdown_deadline: None,
        };
        if let Upstream::ViaMaster(link) = &server.upstream {
            // A worker counts its Pusher connections where the others see them.
            server.registry.app_connections =
                AppConnections::shared(Arc::clone(&link.scoreboard), link.index);
        }
        server.update_accepting(now);
        // The clock's topic exists from the start: tell the cluster.
        server.upstream.interest(crate::topics::TIME, true);
        Ok(server)
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
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept(now),
                    BROKER => self.on_cluster_events(now),
                    CONTROL => self.on_master_messages(now),
                    SIGNALS => {
                        if self.on_signals(now) {
                            return Ok(());
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
            for key in std::mem::take(&mut self.registry.read_again) {
                self.read(key, now);
            }
            if self.turn_over(now) {
                return Ok(());
            }
        }
    }

    /// The end of every loop turn: what the turn changed, then whatever is due.
    /// Returns whether the process is done (shutdown complete).
    fn turn_over(&mut self, mut now: Instant) -> bool {
        // Topics this turn's reads joined or left go upstream first: before this node's
        // report (in `upstream_timers`) tells the cluster about subscribers, the broker
        // subscription for them is on its way.
        self.send_upstream_changes(now);
        if self.shutdown_deadline.is_none() && self.clock.due(now, self.registry.counters.open) {
            let (stamp, frame) = self.clock.stamp();
            tracing::debug!(stamp, "broadcast");
            let time = Target::Topic(crate::topics::TIME.into());
            // With a `--history-for` rule for `time`, ticks get positions like any
            // publication (and are then never coalesced: see `publish_at`).
            // In a cluster each node stamps its own clock: no broker position.
            let position = match self.upstream {
                Upstream::Local => self.keep_in_history(&time, &frame, now),
                _ => None,
            };
            self.publish_at(time, frame, position, WhenDelivered::Clock);
        }
        self.fan_out_slice(now);
        if self.upstream_paused && self.publications.has_room() {
            // Messages that waited while the queue was full (edge-triggered: no new
            // event will say they are there).
            self.upstream_paused = false;
            match self.upstream {
                Upstream::ViaMaster(_) => self.on_master_messages(now),
                Upstream::ViaBroker(_) => self.on_cluster_events(now),
                Upstream::Local => {}
            }
        }
        now = Instant::now();
        if now >= self.timers.next_sweep {
            self.timers.next_sweep = now + self.timers.sweep_every;
            self.sweep(now);
        }
        if self.timers.next_token_check.is_some_and(|at| now >= at) {
            self.timers.next_token_check = Some(now + TOKEN_CHECK_EVERY);
            let leeway = crate::auth::TOKEN_LEEWAY_SECS;
            let unix = crate::auth::unix_now().saturating_sub(leeway);
            self.registry.expire_tokens(unix, now);
        }
        if self.timers.next_history_expiry.is_some_and(|at| now >= at) {
            self.timers.next_history_expiry = Some(now + HISTORY_EXPIRY_EVERY);
            if let Some(history) = self.history.as_mut() {
                history.expire(now);
            }
        }
        self.registry.expire(now);
        // After the expiries and sweeps, which free places too (a handshake that timed
        // out may be what kept this process from accepting: `--max-tls-handshakes`).
        self.update_accepting(now);
        self.upstream_timers(now);
        // Sweeps and expiries change topics too; and the timers queue reports.
        self.send_upstream_changes(now);
        self.publish_counters(now);
        match self.shutdown_deadline {
            Some(deadline) if self.registry.conns.is_empty() || now >= deadline => {
                tracing::info!(unfinished = self.registry.conns.len(), "shutdown complete");
                true
            }
            _ => false,
        }
    }

    /// Tells upstream about topics that got their first or lost their last local
    /// subscriber, then writes everything queued for the master.
    fn send_upstream_changes(&mut self, now: Instant) {
        self.presence_flush(now);
        for (topic, on) in self.registry.take_interest_changes() {
            self.upstream.interest(&topic, on);
            self.stop_listening_unless_subscribed(&topic);
            self.occupancy_webhook(&topic, on, now);
        }
        self.webhooks.flush_due(now);
        self.flush_to_master(now);
    }

    /// How long `poll` may sleep: until the nearest deadline of any kind.
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.registry.read_again.is_empty() {
            return Some(Duration::ZERO);
        }
        [
            self.clock
                .deadline()
                .filter(|_| self.shutdown_deadline.is_none()),
            Some(self.timers.next_stats),
            Some(self.timers.next_sweep),
            self.timers.next_token_check,
            self.timers.next_history_expiry,
            self.registry.next_deadline(),
            self.upstream.next_deadline(),
            self.acceptor.paused_until(),
            self.publications.deadline(now),
            self.copy.next_deadline(),
            self.history_reads.next_deadline(),
            self.webhooks.next_deadline(),
            self.shutdown_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    /// SIGHUP reloads the certificate; SIGINT/SIGTERM starts the shutdown, a second one
    /// ends the process now (returns true).
    fn on_signals(&mut self, now: Instant) -> bool {
        let signals: Vec<i32> = self.signals.pending().collect();
        for signal in signals {
            if signal == SIGHUP {
                self.reload_tls();
            } else if self.shutdown_deadline.is_some() {
                tracing::warn!("second signal: exiting now");
                return true;
            } else {
                self.begin_shutdown(now);
            }
        }
        false
    }

    fn accept(&mut self, now: Instant) {
        if !self.acceptor.is_accepting() {
            return; // a level-triggered event already queued before we stopped
        }
        while self.registry.conns.len() < self.config.max_sockets
            && self.registry.counters.tls_handshaking < self.config.max_tls_handshakes
        {
            let (stream, peer) = match self.acceptor.accept(now, self.registry.conns.len()) {
                Accepted::Connection(stream, peer) => (stream, peer),
                Accepted::Nothing => break,
            };
            if let Err(error) = self.register(stream, peer, now) {
                tracing::warn!(%error, "cannot register connection");
            }
        }
        self.update_accepting(now);
    }

    fn register(
        &mut self,
        stream: mio::net::TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> io::Result<()> {
        stream.set_nodelay(true)?;
        if let Some(bytes) = self.config.send_buffer {
            socket2::SockRef::from(&stream).set_send_buffer_size(bytes)?;
        }
        let session = self.tls.as_ref().map(crate::tls::session).transpose()?;
        let key = self
            .registry
            .register(self.poll.registry(), stream, peer, session, now)?;
        if let Some(source) = self.config.faults.skip_source {
            // Slab keys are reused: a key's previous owner may have been muted.
            if peer.ip() == source {
                self.muted.insert(key);
            } else {
                self.muted.remove(&key);
            }
        }
        Ok(())
    }

    /// Keeps the listener in the epoll set only while this process can take more
    /// connections (see `listener`).
    fn update_accepting(&mut self, now: Instant) {
        let sockets = self.registry.conns.len();
        let room = self.shutdown_deadline.is_none()
            && sockets < self.config.max_sockets
            && self.registry.counters.tls_handshaking < self.config.max_tls_handshakes;
        self.acceptor
            .update(&self.poll, room && self.within_fair_share(sockets), now);
    }

    /// Whether this worker holds no more than its share of the node's sockets (the
    /// mean over the live workers, plus [`FAIR_SHARE_SLACK`]); always true for a
    /// single process.
    ///
    /// Why: workers share one listener with `EPOLLEXCLUSIVE`, and the kernel hands a
    /// connection to the first idle waiter in its queue, so during a ramp the first
    /// workers fill up while the last hold few. A broadcast then lasts as long as the
    /// fullest worker's part of it (each process gets an equal share of the CPU):
    /// 190,000 clients arriving at 10,000/s under a 15 s clock, the round sent at
    /// 144,000 took 2.2 s with five of ten workers full, against 0.6 s for a C server
    /// whose processes get even shares from `SO_REUSEPORT` hashing. A worker past the
    /// mean leaves the listener until the others catch up.
    fn within_fair_share(&self, sockets: usize) -> bool {
        let Upstream::ViaMaster(link) = &self.upstream else {
            return true;
        };
        let mean = link.scoreboard.mean_sockets(link.index, sockets as u64);
        sockets as u64 <= mean + FAIR_SHARE_SLACK
    }

    fn sweep(&mut self, now: Instant) {
        let idle_sweeps = self.config.idle_timeout.map(|idle| {
            let sweeps = idle.as_secs_f64() / self.timers.sweep_every.as_secs_f64();
            sweeps.ceil().clamp(1.0, u8::MAX as f64) as u8
        });
        let ping = self
            .config
            .ping_interval
            .is_some()
            .then_some(&self.ping_frame);
        self.registry.sweep(ping, idle_sweeps, now);
    }

    /// SIGHUP: re-reads the TLS certificate and key. New connections use them; open ones
    /// keep their sessions. A file that does not load leaves the old certificate in use.
    fn reload_tls(&mut self) {
        let Some(files) = self.config.tls.as_ref() else {
            tracing::info!("SIGHUP: no TLS certificate to reload");
            return;
        };
        match crate::tls::load(files, &self.ticketer) {
            Ok(config) => {
                self.tls = Some(config);
                tracing::info!(cert = %files.cert.display(), "TLS certificate reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "TLS certificate reload failed; keeping the old one")
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        tracing::info!(
            open = self.registry.counters.open,
            "shutting down: closing every connection with 1001"
        );
        self.acceptor.close(&self.poll);
        self.shutdown_deadline = Some(now + self.config.close_timeout);
        self.registry.close_all(now);
    }
}
