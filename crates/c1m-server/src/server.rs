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

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use c1m_proto::{CloseCode, DecoderConfig, Role};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::{Domain, Socket, Type};

use crate::clock::Clock;
use crate::config::ServeConfig;
use crate::connection::{Connection, End, Limits, Next, PhaseKind, SendError};
use crate::stats::Stats;

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);

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
}

/// Binds the listener, calls `on_listening` with the bound address, then serves until
/// a shutdown signal.
pub fn run(config: ServeConfig, on_listening: impl FnOnce(SocketAddr)) -> Result<(), ServeError> {
    let mut server = Server::bind(config)?;
    on_listening(server.local_addr);
    server.serve()
}

struct Server {
    config: ServeConfig,
    limits: Limits,
    poll: Poll,
    /// `None` once shutdown has begun.
    listener: Option<TcpListener>,
    local_addr: SocketAddr,
    signals: Signals,
    conns: Slab<Connection>,
    clock: Clock,
    stats: Stats,
    scratch: Box<[u8]>,
    /// (slab key, deadline) of connections in the handshake, oldest first.
    handshake_deadlines: VecDeque<(usize, Instant)>,
    /// (slab key, deadline) of closing connections, oldest first.
    closing_deadlines: VecDeque<(usize, Instant)>,
    /// Connections whose input was not drained in their last turn.
    read_again: Vec<usize>,
    accept_paused_until: Option<Instant>,
    shutdown_deadline: Option<Instant>,
    next_stats: Instant,
}

impl Server {
    fn bind(config: ServeConfig) -> Result<Server, ServeError> {
        let addr = config.listen;
        let listen_error = |source| ServeError::Listen { addr, source };
        let mut listener =
            listen_socket(addr, config.backlog, config.reuse_port).map_err(listen_error)?;
        let local_addr = listener.local_addr().map_err(listen_error)?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let now = Instant::now();
        Ok(Server {
            limits: Limits {
                decoder: DecoderConfig {
                    role: Role::Server,
                    max_message_size: config.max_message_size,
                },
                max_pending_bytes: config.max_pending_bytes,
                max_head_bytes: config.max_head_bytes,
            },
            clock: Clock::new(&config, now),
            next_stats: now + config.stats_interval,
            config,
            poll,
            listener: Some(listener),
            local_addr,
            signals,
            conns: Slab::new(),
            stats: Stats::default(),
            scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
            handshake_deadlines: VecDeque::new(),
            closing_deadlines: VecDeque::new(),
            read_again: Vec::new(),
            accept_paused_until: None,
            shutdown_deadline: None,
        })
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
                    SIGNALS => {
                        if self.signals.pending().next().is_some() {
                            if self.shutdown_deadline.is_some() {
                                tracing::warn!("second signal: exiting now");
                                return Ok(());
                            }
                            self.begin_shutdown(now);
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
            if self.accept_paused_until.is_some_and(|until| now >= until) {
                self.accept_paused_until = None;
                self.accept(now);
            }
            if self.shutdown_deadline.is_none() && self.clock.due(now, self.stats.open) {
                self.broadcast();
                now = Instant::now();
            }
            self.expire(now);
            if now >= self.next_stats {
                self.stats.report(now, self.conns.len());
                self.next_stats = now + self.config.stats_interval;
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
            self.handshake_deadlines.front().map(|&(_, at)| at),
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
        if self.accept_paused_until.is_some() {
            return;
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            match listener.accept() {
                Ok((stream, _peer)) => {
                    if let Err(error) = self.register(stream, now) {
                        tracing::warn!(%error, "cannot register connection");
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if is_resource_exhaustion(&e) => {
                    tracing::warn!(error = %e, open = self.conns.len(), "accept failed; pausing accepts briefly");
                    self.accept_paused_until = Some(now + ACCEPT_BACKOFF);
                    return;
                }
                // A connection reset before we accepted it, and the like: try the next.
                Err(_) => continue,
            }
        }
    }

    fn register(&mut self, mut stream: TcpStream, now: Instant) -> io::Result<()> {
        stream.set_nodelay(true)?;
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let deadline = now + self.config.handshake_timeout;
        entry.insert(Connection::new(stream, deadline));
        self.handshake_deadlines.push_back((key, deadline));
        self.stats.accepted += 1;
        Ok(())
    }

    fn read(&mut self, key: usize, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let before = conn.kind();
        let closing_deadline = now + self.config.close_timeout;
        let next = conn.on_readable(
            &mut self.scratch,
            &self.limits,
            closing_deadline,
            &mut self.stats,
        );
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

    /// Bookkeeping after a connection handled an event: phase counters, deadlines,
    /// removal.
    fn after(&mut self, key: usize, before: PhaseKind, next: Next) {
        match next {
            Next::Remove(end) => return self.remove(key, end),
            Next::ReadAgain => self.read_again.push(key),
            Next::Keep => {}
        }
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let after = conn.kind();
        if before == after {
            return;
        }
        if after == PhaseKind::Open {
            self.stats.open += 1;
        }
        if before == PhaseKind::Open {
            self.stats.open -= 1;
        }
        if after == PhaseKind::Closing {
            if let Some(deadline) = conn.deadline() {
                self.closing_deadlines.push_back((key, deadline));
            }
        }
    }

    fn remove(&mut self, key: usize, end: End) {
        let Some(mut conn) = self.conns.try_remove(key) else {
            return;
        };
        if conn.kind() == PhaseKind::Open {
            self.stats.open -= 1;
        }
        match end {
            End::SlowConsumer => self.stats.slow_consumers += 1,
            End::Io => self.stats.io_errors += 1,
            End::PeerClosed => {}
        }
        let _ = self.poll.registry().deregister(conn.stream_mut());
    }

    /// The hot path: stamp once, then hand the same frame to every open connection.
    fn broadcast(&mut self) {
        let (stamp, frame) = self.clock.stamp();
        let started = Instant::now();
        let mut sent = 0u64;
        let mut failed: Vec<(usize, End)> = Vec::new();
        let skip_every = self.config.faults.skip_every.unwrap_or(0);
        let mut open_seen = 0usize;
        for (key, conn) in self.conns.iter_mut() {
            if conn.kind() != PhaseKind::Open {
                continue;
            }
            open_seen += 1;
            if skip_every > 0 && open_seen.is_multiple_of(skip_every) {
                continue; // test fault: see `Faults`
            }
            match conn.send(&frame, &self.limits) {
                Ok(()) => sent += 1,
                Err(SendError::Overflow) => failed.push((key, End::SlowConsumer)),
                Err(SendError::Io(_)) => failed.push((key, End::Io)),
            }
        }
        let fanout = started.elapsed();
        for (key, end) in failed {
            self.remove(key, end);
        }
        self.stats.broadcasts += 1;
        self.stats.frames_out += sent;
        self.stats.last_fanout = fanout;
        tracing::debug!(
            stamp,
            sent,
            fanout_ms = fanout.as_secs_f64() * 1e3,
            "broadcast"
        );
    }

    /// Closes connections whose handshake or close handshake took too long.
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, deadline)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            // The slot may have been reused by a newer connection with its own deadline.
            let conn = self.conns.get(key);
            if conn
                .is_some_and(|c| c.kind() == PhaseKind::Handshake && c.deadline() == Some(deadline))
            {
                self.stats.handshake_timeouts += 1;
                self.remove(key, End::PeerClosed);
            }
        }
        while let Some(&(key, deadline)) = self.closing_deadlines.front() {
            if deadline > now {
                break;
            }
            self.closing_deadlines.pop_front();
            let conn = self.conns.get(key);
            if conn
                .is_some_and(|c| c.kind() == PhaseKind::Closing && c.deadline() == Some(deadline))
            {
                self.remove(key, End::PeerClosed);
            }
        }
    }

    fn begin_shutdown(&mut self, now: Instant) {
        tracing::info!(
            open = self.stats.open,
            "shutting down: closing every connection with 1001"
        );
        if let Some(mut listener) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut listener);
        }
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
                PhaseKind::Handshake => Next::Remove(End::PeerClosed),
                PhaseKind::Closing => Next::Keep,
            };
            self.after(key, before, next);
        }
    }
}

/// A non-blocking listening socket with the backlog we ask for. (`std`'s and tokio's
/// `bind` use a fixed backlog of 128 or 1024, which throttles a fast ramp-up.)
fn listen_socket(addr: SocketAddr, backlog: i32, reuse_port: bool) -> io::Result<TcpListener> {
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

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
