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
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use bytes::Bytes;
use c1m_proto::{CloseCode, DecoderConfig, Role};
use mio::net::{TcpListener, TcpStream, UnixStream};
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;
use slab::Slab;
use socket2::{Domain, Socket, Type};

use crate::clock::Clock;
use crate::config::ServeConfig;
use crate::connection::{Connection, End, Limits, Next, PhaseKind, SendError};
use crate::scoreboard::Scoreboard;
use crate::stats::{rss_bytes, Stats};

const LISTENER: Token = Token(usize::MAX - 1);
const SIGNALS: Token = Token(usize::MAX - 2);
const CONTROL: Token = Token(usize::MAX - 3);

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
    /// Whether the listener is in the epoll set (it is taken out while this process is
    /// full or out of descriptors, so the kernel queues connections for other workers).
    accepting: bool,
    shutdown_deadline: Option<Instant>,
    next_stats: Instant,
    /// Set in a worker process; `None` for a single-process server.
    worker: Option<Worker>,
}

/// The worker side of a multi-process server.
struct Worker {
    index: usize,
    scoreboard: Scoreboard,
    control: UnixStream,
    /// Bytes read from `control` not yet forming a complete message.
    control_buf: Vec<u8>,
}

impl Server {
    fn new(
        config: ServeConfig,
        listener: TcpListener,
        role: Option<WorkerRole>,
    ) -> Result<Server, ServeError> {
        let local_addr = listener.local_addr()?;
        let poll = Poll::new()?;
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        let worker = match role {
            None => None,
            Some(role) => {
                role.control.set_nonblocking(true)?;
                let mut control = UnixStream::from_std(role.control);
                poll.registry()
                    .register(&mut control, CONTROL, Interest::READABLE)?;
                role.scoreboard.reset(role.index);
                role.scoreboard
                    .slot(role.index)
                    .pid
                    .store(std::process::id() as u64, Relaxed);
                Some(Worker {
                    index: role.index,
                    scoreboard: role.scoreboard,
                    control,
                    control_buf: Vec::new(),
                })
            }
        };
        let now = Instant::now();
        let mut clock_config = config.clone();
        // A worker broadcasts what its master sends; only a single process keeps time.
        clock_config.connect_only |= worker.is_some();
        let mut server = Server {
            limits: Limits {
                decoder: DecoderConfig {
                    role: Role::Server,
                    max_message_size: config.max_message_size,
                },
                max_pending_bytes: config.max_pending_bytes,
                max_head_bytes: config.max_head_bytes,
                echo: config.echo,
            },
            clock: Clock::new(&clock_config, now),
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
            accepting: false,
            shutdown_deadline: None,
            worker,
        };
        server.set_accepting(true)?;
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
                    CONTROL => {
                        if let Err(error) = self.read_control() {
                            if self.shutdown_deadline.is_none() {
                                tracing::warn!(%error, "control channel to the master lost: shutting down");
                                self.begin_shutdown(now);
                            }
                        }
                    }
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
            }
            self.update_accepting();
            if self.shutdown_deadline.is_none() && self.clock.due(now, self.stats.open) {
                let (stamp, frame) = self.clock.stamp();
                tracing::debug!(stamp, "broadcast");
                self.fan_out(&frame);
                now = Instant::now();
            }
            self.expire(now);
            self.publish(now);
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
                Ok((stream, _peer)) => {
                    if let Err(error) = self.register(stream, now) {
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
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let before = conn.kind();
        let closing_deadline = now + self.config.close_timeout;
        let admit = before != PhaseKind::Handshake || self.has_room();
        let next = self.conns[key].on_readable(
            &mut self.scratch,
            &self.limits,
            closing_deadline,
            admit,
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

    /// The hot path: hand one shared, already-encoded frame to every open connection.
    fn fan_out(&mut self, frame: &Bytes) {
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
            match conn.send(frame, &self.limits) {
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
        tracing::debug!(sent, fanout_ms = fanout.as_secs_f64() * 1e3, "fan-out done");
    }

    /// Reads broadcast frames sent by the master and fans each out.
    fn read_control(&mut self) -> io::Result<()> {
        let Some(worker) = self.worker.as_mut() else {
            return Ok(());
        };
        let mut chunk = [0u8; 4096];
        loop {
            match worker.control.read(&mut chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => worker.control_buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let mut frames = Vec::new();
        while let Some(len) = worker.control_buf.get(..4) {
            let len = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
            if worker.control_buf.len() < 4 + len {
                break;
            }
            frames.push(Bytes::copy_from_slice(&worker.control_buf[4..4 + len]));
            worker.control_buf.drain(..4 + len);
        }
        for frame in frames {
            if self.shutdown_deadline.is_none() {
                self.fan_out(&frame);
            }
        }
        Ok(())
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
    fn publish(&mut self, now: Instant) {
        let due = now >= self.next_stats;
        if due {
            self.next_stats = now + self.config.stats_interval;
        }
        match &self.worker {
            None if due => self.stats.report(now, self.conns.len()),
            None => {}
            Some(w) => {
                let slot = w.scoreboard.slot(w.index);
                slot.open.store(self.stats.open as u64, Relaxed);
                slot.other_sockets
                    .store((self.conns.len() - self.stats.open) as u64, Relaxed);
                slot.frames_out.store(self.stats.frames_out, Relaxed);
                slot.broadcasts.store(self.stats.broadcasts, Relaxed);
                slot.last_fanout_us
                    .store(self.stats.last_fanout.as_micros() as u64, Relaxed);
                slot.rejected_full.store(self.stats.rejected_full, Relaxed);
                if due {
                    slot.rss_bytes.store(rss_bytes().unwrap_or(0), Relaxed);
                }
            }
        }
    }

    /// Closes connections whose handshake or close handshake took too long.
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
            PhaseKind::Handshake,
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
            PhaseKind::Closing,
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
                PhaseKind::Handshake => Next::Remove(End::PeerClosed),
                PhaseKind::Closing => Next::Keep,
            };
            self.after(key, before, next);
        }
    }
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

/// Pops the front of a deadline queue of connections in phase `kind`: entries whose
/// connection has moved on (left the phase, or its slot was reused with another deadline)
/// at once, live ones once due, whose keys go to `expired`.
fn pop_expired(
    queue: &mut VecDeque<(usize, Instant)>,
    conns: &Slab<Connection>,
    kind: PhaseKind,
    now: Instant,
    expired: &mut Vec<usize>,
) {
    while let Some(&(key, deadline)) = queue.front() {
        let waiting = conns
            .get(key)
            .is_some_and(|c| c.kind() == kind && c.deadline() == Some(deadline));
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
