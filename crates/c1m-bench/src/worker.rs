//! One load-generating process: opens its share of the connections at a steady pace,
//! reads every message, and measures.
//!
//! Like the server, it is one `mio` event loop over a slab of small client states, so
//! one process can hold ~19,000 connections (the `nofile` limit here) cheaply. Each
//! connection binds to a source address from `--source-ips` with
//! `IP_BIND_ADDRESS_NO_PORT`, which lets the kernel pick the port at `connect` time
//! per (source, destination) pair instead of reserving one per source at `bind` time:
//! that is what lets ~64k connections per source address reach one server port.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use c1m_proto::frame::{close_payload, encode_frame};
use c1m_proto::handshake::{self, ClientHandshakeError};
use c1m_proto::{CloseCode, Decoder, DecoderConfig, Event, OpCode, Role};
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use socket2::{Domain, Socket, Type};

mod client;
mod socket;

use client::{Client, ClientTls, Handshake, Phase};
pub use socket::io_cause;
use socket::{connect, error_cause};

use crate::payload::{stamp_micros, stamp_of_value};
use crate::recovery::{Positions, Seen};
use crate::snapshot::{Round, Snapshot, MAX_LATENCY_US};
use crate::target::Target;

const SCRATCH_BYTES: usize = 64 * 1024;
const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Largest message the bench reassembles to look for a timestamp.
const MAX_MESSAGE_BYTES: usize = 1 << 20;
/// Most connections opened in one loop turn, so a burst cannot starve reading.
const MAX_OPENS_PER_TURN: usize = 512;
const MAX_READS_PER_TURN: usize = 4;
/// A round two rounds old with no delivery for this long is over even for connections
/// that received nothing since (a server that skips some connections altogether).
const ROUND_QUIET_US: u64 = 1_000_000;
/// Time given to the server to answer our close frames at the end of a run.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// What one worker does.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub target: Target,
    pub connections: usize,
    /// Connections opened per second (this worker's share).
    pub rate: f64,
    /// Source addresses to spread connections over; empty lets the kernel choose.
    pub sources: Vec<IpAddr>,
    pub duration: Option<Duration>,
    /// Stop once every connection got this many messages.
    pub messages: Option<u64>,
    pub connect_timeout: Duration,
    /// Time between snapshots handed to the caller.
    pub snapshot_interval: Duration,
    /// Reopen a connection that failed or ended, after a jittered exponential backoff.
    pub reconnect: bool,
    /// Close each connection cleanly after about this long (±50 %, jittered), to make churn;
    /// with `reconnect` it is reopened at once.
    pub lifetime: Option<Duration>,
    /// `--recover`: ask for envelopes, keep each connection's positions, resume from
    /// them on every reconnect and count what never arrived (see [`crate::recovery`]).
    pub recover: bool,
    /// `--pusher-channel`: speak the Pusher protocol and subscribe as this plan says.
    pub pusher: Option<crate::pusher::PusherPlan>,
    /// TLS settings, for a `wss://` target.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// Stamps of rounds other workers saw (with `--procs`, the parent fills it). A
    /// worker whose connections received none of a round still counts them as
    /// expected for it, so a total loss on one worker is counted as missed.
    pub rounds_elsewhere: Option<std::sync::Arc<std::sync::Mutex<Vec<u64>>>>,
}

/// First reconnect delay; it doubles with every consecutive failure, up to the cap.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(10);

/// The delay before reconnect attempt number `attempt` (0 = right after a success):
/// half of the exponential step plus a random half ("equal jitter"), so a whole
/// population cut off at once does not come back in lockstep.
pub fn backoff(attempt: u32) -> Duration {
    let step = BACKOFF_BASE
        .saturating_mul(1 << attempt.min(16))
        .min(BACKOFF_CAP);
    step / 2 + step.mul_f64(rand::random::<f64>() / 2.0)
}

/// When to come back after a `Retry-After` of `asked`: never sooner, and up to a fifth
/// of it later (at most 1 s). `Retry-After` has whole seconds, so the clients a server
/// refused in the same second and told the same number would otherwise all return in
/// the same instant and meet the same admission window again.
pub fn after_retry_after(asked: Duration) -> Duration {
    let spread = (asked / 5).min(Duration::from_secs(1));
    asked + spread.mul_f64(rand::random::<f64>())
}

/// Why a connection ended, as an error cause; `None` for an orderly end we asked for.
type Cause = Option<String>;

/// Per-round accumulation inside this worker.
#[derive(Debug, Default, Clone, Copy)]
struct RoundAcc {
    delivered: u64,
    delivered_expected: u64,
    first_us: u64,
    last_us: u64,
}

struct Worker {
    config: WorkerConfig,
    poll: Poll,
    clients: Slab<Client>,
    scratch: Box<[u8]>,
    snap: Snapshot,
    rounds: HashMap<u64, RoundAcc>,
    /// Wall µs at which each connection opened, in opening order (so sorted).
    open_times: Vec<u64>,
    /// (opened_us, last_stamp) of every connection that ended unplanned.
    ended: Vec<(u64, u64)>,
    /// Deadlines of connects and handshakes, oldest first (one timeout for both).
    deadlines: VecDeque<(usize, Instant)>,
    read_again: Vec<usize>,
    /// Connections connecting or handshaking.
    pending: usize,
    /// Open connections that reached `--messages`.
    done: usize,
    /// Connections to reopen: (when, index, attempt), soonest first.
    retries: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    /// Planned closes for `--lifetime`: (when, slab key, opened_us), soonest first.
    expiries: BinaryHeap<Reverse<(Instant, usize, u64)>>,
    /// Set once the run is ending: nothing is reopened any more.
    stopping: bool,
    start: Instant,
    /// `still_waiting` as it was when the run ended (before closing every connection).
    waiting_at_end: Option<HashMap<u64, (u64, u64)>>,
    /// With `--recover`, every connection's positions, by index.
    positions: Option<Positions>,
}

/// Runs a worker until its stop condition or `stop`, handing a snapshot to
/// `on_snapshot` every `snapshot_interval`. Returns the final snapshot.
pub fn run(
    config: WorkerConfig,
    stop: &AtomicBool,
    mut on_snapshot: impl FnMut(&Snapshot),
) -> io::Result<Snapshot> {
    let mut worker = Worker {
        poll: Poll::new()?,
        clients: Slab::with_capacity(config.connections),
        scratch: vec![0; SCRATCH_BYTES].into_boxed_slice(),
        snap: Snapshot::default(),
        rounds: HashMap::new(),
        open_times: Vec::with_capacity(config.connections),
        ended: Vec::new(),
        deadlines: VecDeque::new(),
        read_again: Vec::new(),
        pending: 0,
        done: 0,
        retries: BinaryHeap::new(),
        expiries: BinaryHeap::new(),
        stopping: false,
        waiting_at_end: None,
        positions: config.recover.then(|| Positions::new(config.connections)),
        start: Instant::now(),
        config,
    };
    worker.run(stop, &mut on_snapshot)
}

fn wall_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

impl Worker {
    fn run(
        &mut self,
        stop: &AtomicBool,
        on_snapshot: &mut impl FnMut(&Snapshot),
    ) -> io::Result<Snapshot> {
        let start = self.start;
        let mut events = Events::with_capacity(1024);
        let mut next_snapshot = start + self.config.snapshot_interval;
        let mut opened = 0usize;
        loop {
            let now = Instant::now();
            let elapsed = now - start;
            // Pace connection opening smoothly: by time t, rate × t connections.
            let due = ((self.config.rate * elapsed.as_secs_f64()) as usize + 1)
                .min(self.config.connections);
            let mut burst = 0;
            while opened < due && burst < MAX_OPENS_PER_TURN {
                self.open(opened as u32, 0, now);
                opened += 1;
                burst += 1;
            }
            while burst < MAX_OPENS_PER_TURN {
                match self.retries.peek() {
                    Some(Reverse((at, index, attempt))) if *at <= now => {
                        let (index, attempt) = (*index, *attempt);
                        self.retries.pop();
                        self.snap.reconnects += 1;
                        self.open(index, attempt, now);
                        burst += 1;
                    }
                    _ => break,
                }
            }
            self.expire_lifetimes(now);
            if self.should_stop(opened, elapsed) || stop.load(Ordering::Relaxed) {
                break;
            }
            let mut timeout =
                (next_snapshot.saturating_duration_since(now)).min(Duration::from_millis(100));
            if opened < self.config.connections {
                timeout = timeout.min(
                    Duration::from_secs_f64(1.0 / self.config.rate).max(Duration::from_millis(1)),
                );
            }
            let next_retry = self.retries.peek().map(|Reverse((at, _, _))| *at);
            let next_expiry = self.expiries.peek().map(|Reverse((at, _, _))| *at);
            for at in [next_retry, next_expiry].into_iter().flatten() {
                timeout = timeout.min(at.saturating_duration_since(now));
            }
            if !self.read_again.is_empty() || burst == MAX_OPENS_PER_TURN {
                timeout = Duration::ZERO;
            }
            self.poll_once(&mut events, timeout)?;
            self.expire(Instant::now());
            if Instant::now() >= next_snapshot {
                self.update_snapshot(start);
                on_snapshot(&self.snap);
                next_snapshot += self.config.snapshot_interval;
            }
        }
        // Report the connections held at the end, not the zero left after closing them.
        self.stopping = true;
        let active_at_end = self.snap.active;
        // Likewise the rounds connections were still waiting for: closing them must not
        // make those rounds look finished, and their receivers look like misses.
        let latest = self.rounds.keys().copied().max().unwrap_or(0);
        self.waiting_at_end = Some(self.still_waiting(latest));
        self.close_all(&mut events)?;
        self.update_snapshot(start);
        self.snap.active = active_at_end;
        Ok(self.snap.clone())
    }

    /// Whether `client` is in `done`: it got its `--messages`, or with `--messages 0`
    /// it is open (Pusher: and its subscription was answered).
    fn counted_done(&self, client: &Client) -> bool {
        match self.config.messages {
            Some(0) if self.config.pusher.is_some() => client.subscribed,
            Some(k) => client.received >= k,
            None => false,
        }
    }

    fn should_stop(&self, opened: usize, elapsed: Duration) -> bool {
        if self.config.duration.is_some_and(|d| elapsed >= d) {
            return true;
        }
        let all_started = opened == self.config.connections;
        if all_started && self.pending == 0 && self.clients.is_empty() && self.retries.is_empty() {
            return true; // nothing left that could happen
        }
        self.config.messages.is_some()
            && all_started
            && self.pending == 0
            && self.done == self.snap.active as usize
    }

    fn poll_once(&mut self, events: &mut Events, timeout: Duration) -> io::Result<()> {
        match self.poll.poll(events, Some(timeout)) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Ok(()),
            other => other?,
        }
        for event in events.iter() {
            let key = event.token().0;
            self.on_event(key);
        }
        for key in std::mem::take(&mut self.read_again) {
            self.on_event(key);
        }
        Ok(())
    }

    fn error(&mut self, cause: impl Into<String>) {
        *self.snap.errors.entry(cause.into()).or_default() += 1;
    }

    /// Starts connection number `index`; `attempt` counts the failures before it.
    fn open(&mut self, index: u32, attempt: u32, now: Instant) {
        self.snap.attempted += 1;
        let source = (!self.config.sources.is_empty())
            .then(|| self.config.sources[index as usize % self.config.sources.len()]);
        let stream = match connect(self.config.target.addr, source) {
            Ok(stream) => stream,
            Err(e) => {
                self.error(format!("connect.{}", io_cause(&e)));
                self.schedule_retry(index, attempt + 1, now);
                return;
            }
        };
        let entry = self.clients.vacant_entry();
        let key = entry.key();
        let mut stream = stream;
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            self.error(format!("connect.{}", io_cause(&e)));
            self.schedule_retry(index, attempt + 1, now);
            return;
        }
        let deadline = now + self.config.connect_timeout;
        entry.insert(Client {
            stream,
            phase: Phase::Connecting { deadline },
            decoder: None,
            partial: None,
            opened_us: 0,
            last_stamp: 0,
            received: 0,
            subscribed: false,
            index,
            attempt,
            tls: None,
        });
        self.deadlines.push_back((key, deadline));
        self.pending += 1;
    }

    fn on_event(&mut self, key: usize) {
        let Some(client) = self.clients.get_mut(key) else {
            return;
        };
        let outcome = match client.phase {
            Phase::Connecting { .. } => self.on_connecting(key),
            _ => match client.flush_tls() {
                Ok(()) => self.on_readable(key),
                Err(e) => Err(Some(error_cause(&e))),
            },
        };
        if let Err(cause) = outcome {
            self.end(key, cause);
        }
    }

    fn on_connecting(&mut self, key: usize) -> Result<(), Cause> {
        let client = &mut self.clients[key];
        if let Ok(Some(e)) | Err(e) = client.stream.take_error() {
            return Err(Some(format!("connect.{}", io_cause(&e))));
        }
        match client.stream.peer_addr() {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return Ok(()), // not yet
            Err(e) => return Err(Some(format!("connect.{}", io_cause(&e)))),
        }
        if self.config.target.raw {
            // `tcp://`: no handshake; the connection is open once connected.
            let started = match client.phase {
                Phase::Connecting { deadline } => deadline - self.config.connect_timeout,
                _ => unreachable!("on_connecting is only called while connecting"),
            };
            self.clients[key].phase = Phase::Open;
            self.opened(key, started);
            return self.on_readable(key);
        }
        if let Some(config) = &self.config.tls {
            let name =
                rustls::pki_types::ServerName::try_from(self.config.target.server_name.clone())
                    .map_err(|_| Some("tls.bad_server_name".to_string()))?;
            let tls = ClientTls::start(config, name).map_err(|e| Some(format!("tls.{e}")))?;
            client.tls = Some(Box::new(tls));
            client
                .flush_tls()
                .map_err(|e| Some(format!("io.{}", io_cause(&e))))?;
        }
        let key_text = handshake::client_key(rand::random());
        let path = match self.positions.as_mut() {
            Some(positions) => positions.request_path(client.index, &self.config.target.path),
            None => self.config.target.path.clone(),
        };
        let request = handshake::client_request(&self.config.target.host, &path, &key_text);
        // With TLS the request waits in the session until the handshake is done.
        match client.write_out(&request) {
            Ok(n) if n == request.len() => {}
            Ok(_) => return Err(Some("io.short_write".into())),
            Err(e) => return Err(Some(format!("io.{}", io_cause(&e)))),
        }
        let deadline = match client.phase {
            Phase::Connecting { deadline } => deadline,
            _ => unreachable!("on_connecting is only called while connecting"),
        };
        client.phase = Phase::Handshake(Box::new(Handshake {
            key: key_text,
            head: Vec::new(),
            deadline,
            retry_after: None,
        }));
        // The response may already be here.
        self.on_readable(key)
    }

    fn on_readable(&mut self, key: usize) -> Result<(), Cause> {
        for _ in 0..MAX_READS_PER_TURN {
            let client = &mut self.clients[key];
            let n = match client.read_in(&mut self.scratch) {
                Ok(0) => {
                    return Err(match client.phase {
                        Phase::Closing => None,
                        _ => Some("io.eof_without_close".into()),
                    })
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    return Err(match client.phase {
                        Phase::Closing => None,
                        _ => Some(error_cause(&e)),
                    })
                }
            };
            let mut input = std::mem::take(&mut self.scratch);
            let result = self.on_input(key, &mut input[..n]);
            self.scratch = input;
            result?;
        }
        self.read_again.push(key);
        Ok(())
    }

    fn on_input(&mut self, key: usize, input: &mut [u8]) -> Result<(), Cause> {
        let client = &mut self.clients[key];
        if let Phase::Handshake(hs) = &mut client.phase {
            hs.head.extend_from_slice(input);
            let used = match handshake::parse_response(&hs.head, &hs.key, MAX_HEAD_BYTES) {
                Ok(None) => return Ok(()),
                Ok(Some(used)) => used,
                Err(ClientHandshakeError::Status { code, retry_after }) => {
                    // Honoured by the reconnect (see `end`).
                    hs.retry_after = retry_after.map(Duration::from_secs);
                    return Err(Some(format!("handshake.status.{code}")));
                }
                Err(_) => return Err(Some("handshake.invalid".into())),
            };
            let Phase::Handshake(mut hs) = std::mem::replace(&mut client.phase, Phase::Open) else {
                unreachable!("matched above");
            };
            self.opened(key, hs.deadline - self.config.connect_timeout);
            let rest = &mut hs.head[used..];
            return if rest.is_empty() {
                Ok(())
            } else {
                self.on_frames(key, rest)
            };
        }
        if self.config.target.raw {
            return self.on_lines(key, input);
        }
        self.on_frames(key, input)
    }

    /// Bookkeeping of a connection that just opened (handshake done, or connected for
    /// raw TCP) after a connect started at `started`.
    fn opened(&mut self, key: usize, started: Instant) {
        let took = started.elapsed().as_micros() as u64;
        let _ = self.snap.connect.record(took.clamp(1, MAX_LATENCY_US));
        let client = &mut self.clients[key];
        if let Some(tls) = client.tls.as_deref() {
            self.snap.tls_handshakes += 1;
            self.snap.tls_resumed += u64::from(tls.session.resumed());
        }
        client.opened_us = wall_us();
        self.open_times.push(client.opened_us);
        if let Some(plan) = self.config.pusher.as_ref().filter(|plan| !plan.signs()) {
            // The server reads it after its `pusher:connection_established`. (A signed
            // one waits for that message's socket id: see `record_message`.)
            let subscribe = plan.subscribe(client.index as usize, None);
            client.send_text(subscribe.as_bytes());
        }
        if let Some(positions) = self.positions.as_mut() {
            positions.opened(client.index);
        }
        if let Some(lifetime) = self.config.lifetime {
            let jittered = lifetime.mul_f64(0.5 + rand::random::<f64>());
            self.expiries
                .push(Reverse((Instant::now() + jittered, key, client.opened_us)));
        }
        self.pending -= 1;
        self.snap.active += 1;
        self.snap.established += 1;
        self.snap.ramp_secs = self.start.elapsed().as_secs_f64();
        // A Pusher connection is ready once its subscription is answered (see
        // `record_message`); counting it at the upgrade would end a `--messages 0` run
        // before its last subscriptions reached the server.
        if self.config.messages == Some(0) && self.config.pusher.is_none() {
            self.done += 1;
        }
    }

    /// Raw TCP input (`tcp://`, the baseline without WebSocket framing): each
    /// newline-terminated line is one message.
    fn on_lines(&mut self, key: usize, input: &[u8]) -> Result<(), Cause> {
        let now_us = wall_us();
        let Worker {
            clients,
            snap,
            rounds,
            done,
            config,
            ..
        } = self;
        let mut tally = Tally {
            snap,
            rounds,
            done,
            target_messages: config.messages,
            positions: None, // --recover needs WebSocket envelopes
            pusher: None,
        };
        let client = &mut clients[key];
        let mut rest = input;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            match client.partial.take() {
                None => record_message(&mut tally, client, line, now_us),
                Some(mut start) => {
                    start.extend_from_slice(line);
                    record_message(&mut tally, client, &start, now_us);
                }
            }
            rest = &rest[end + 1..];
        }
        if !rest.is_empty() {
            let partial = client.partial.get_or_insert_with(Box::default);
            partial.extend_from_slice(rest);
            if partial.len() > MAX_MESSAGE_BYTES {
                return Err(Some("protocol.line_too_long".into()));
            }
        }
        Ok(())
    }

    fn on_frames(&mut self, key: usize, input: &mut [u8]) -> Result<(), Cause> {
        let now_us = wall_us();
        // Split the borrows so each message is measured where it is decoded, in place.
        let Worker {
            clients,
            snap,
            rounds,
            done,
            config,
            positions,
            ..
        } = self;
        let mut tally = Tally {
            snap,
            rounds,
            done,
            target_messages: config.messages,
            positions: positions.as_mut(),
            pusher: config.pusher.as_ref(),
        };
        let client = &mut clients[key];
        let mut decoder = client.decoder.take().unwrap_or_else(|| {
            Box::new(Decoder::new(DecoderConfig {
                role: Role::Client,
                max_message_size: MAX_MESSAGE_BYTES as u64,
                compression: false,
            }))
        });
        let mut pongs: Vec<Vec<u8>> = Vec::new();
        let mut closed: Option<Option<u16>> = None;
        let mut record = |client: &mut Client, payload: &[u8]| {
            record_message(&mut tally, client, payload, now_us);
        };
        let result = decoder.decode(input, |event| match event {
            Event::Data {
                payload,
                message_end,
                ..
            } => match (client.partial.as_mut(), message_end) {
                // The common case: a whole message in this read, measured in place.
                (None, true) => record(client, payload),
                (partial, _) => {
                    let buf = match partial {
                        Some(buf) => buf,
                        None => client.partial.insert(Box::default()),
                    };
                    buf.extend_from_slice(payload);
                    if message_end {
                        let whole = client.partial.take().expect("just filled");
                        record(client, &whole);
                    }
                }
            },
            Event::Ping(payload) => {
                let mut frame = Vec::new();
                encode_frame(OpCode::Pong, payload, Some(rand::random()), &mut frame);
                pongs.push(frame);
            }
            Event::Pong(_) => {}
            Event::Close { code, .. } => closed = Some(code.map(|c| c.0)),
        });
        let ok = result.is_ok() && closed.is_none();
        if ok && !decoder.is_idle() {
            client.decoder = Some(decoder);
        }
        for pong in pongs {
            let _ = client.write_out(&pong); // best effort: a load tool need not queue pongs
        }
        if let Some(code) = closed {
            let client = &mut self.clients[key];
            if matches!(client.phase, Phase::Closing) {
                return Err(None); // the server answered our close
            }
            // Echo the server's code (RFC 6455 §5.5.1).
            client.send_close(&code.map(|c| c.to_be_bytes().to_vec()).unwrap_or_default());
            return Err(Some(match code {
                Some(code) => format!("closed.{code}"),
                None => "closed.no_code".into(),
            }));
        }
        if let Err(error) = result {
            self.clients[key].send_close(&close_payload(error.close_code(), ""));
            return Err(Some(format!("protocol.{}", error.close_code().0)));
        }
        Ok(())
    }

    /// Drops a connection, counting `cause` as an error if there is one.
    fn end(&mut self, key: usize, cause: Cause) {
        let Some(mut client) = self.clients.try_remove(key) else {
            return;
        };
        let _ = self.poll.registry().deregister(&mut client.stream);
        match client.phase {
            // Closing while the run goes on: its --lifetime was up; replace it at once.
            Phase::Closing if self.config.reconnect && !self.stopping => {
                self.retries
                    .push(Reverse((Instant::now(), client.index, 0)));
            }
            // A connection that got through starts its backoff afresh.
            Phase::Open | Phase::Closing => self.schedule_retry(client.index, 0, Instant::now()),
            // The server said when to come back (503 or 429 with Retry-After): not before.
            Phase::Handshake(ref hs) if hs.retry_after.is_some() => {
                let wait = after_retry_after(hs.retry_after.unwrap_or_default());
                if self.config.reconnect && !self.stopping {
                    let at = Instant::now() + wait;
                    self.retries
                        .push(Reverse((at, client.index, client.attempt + 1)));
                }
            }
            _ => self.schedule_retry(client.index, client.attempt + 1, Instant::now()),
        }
        match client.phase {
            Phase::Connecting { .. } | Phase::Handshake(_) => self.pending -= 1,
            Phase::Open | Phase::Closing => {
                self.snap.active -= 1;
                // Connections we close at the end of the run stay expected for the rounds
                // stamped while they were open; only an unplanned end excuses them.
                if matches!(client.phase, Phase::Open) {
                    self.ended.push((client.opened_us, client.last_stamp));
                }
                if self.counted_done(&client) {
                    self.done -= 1;
                }
            }
        }
        if let Some(cause) = cause {
            self.error(cause);
        }
    }

    /// With `--reconnect`, queues connection `index` to be reopened after its backoff.
    fn schedule_retry(&mut self, index: u32, attempt: u32, now: Instant) {
        if self.config.reconnect && !self.stopping {
            self.retries
                .push(Reverse((now + backoff(attempt), index, attempt)));
        }
    }

    /// With `--lifetime`, closes the connections whose time is up (a clean close 1000).
    fn expire_lifetimes(&mut self, now: Instant) {
        while let Some(Reverse((at, key, opened_us))) = self.expiries.peek().copied() {
            if at > now {
                break;
            }
            self.expiries.pop();
            let Some(client) = self.clients.get_mut(key) else {
                continue;
            };
            if client.opened_us != opened_us || !matches!(client.phase, Phase::Open) {
                continue; // the slot holds another connection by now
            }
            client.begin_close(self.config.target.raw);
        }
    }

    /// Ends connects and handshakes that took too long. As in the server, entries of
    /// connections that have moved on are dropped from the front at once, so under churn
    /// the queue does not hold one entry per connection of the last `--connect-timeout`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(key, deadline)) = self.deadlines.front() {
            let cause = match self.clients.get(key).map(|c| &c.phase) {
                Some(Phase::Connecting { deadline: d }) if *d == deadline => {
                    Some("connect.timeout")
                }
                Some(Phase::Handshake(hs)) if hs.deadline == deadline => Some("handshake.timeout"),
                _ => None,
            };
            if cause.is_some() && deadline > now {
                break;
            }
            self.deadlines.pop_front();
            if let Some(cause) = cause {
                self.end(key, Some(cause.into()));
            }
        }
    }

    /// Ends the run: a close frame to every open connection, a short wait for the
    /// server's answers, then everything is dropped.
    fn close_all(&mut self, events: &mut Events) -> io::Result<()> {
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            let client = &mut self.clients[key];
            if matches!(client.phase, Phase::Open) {
                client.begin_close(self.config.target.raw);
            } else if !matches!(client.phase, Phase::Closing) {
                self.end(key, None);
            }
        }
        let deadline = Instant::now() + CLOSE_GRACE;
        while !self.clients.is_empty() && Instant::now() < deadline {
            self.poll_once(events, Duration::from_millis(50))?;
        }
        let keys: Vec<usize> = self.clients.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.end(key, None);
        }
        Ok(())
    }

    /// For each round but the latest, how many open connections may still receive it
    /// (opened before its stamp, nothing as recent received yet), and how many of those
    /// have received no round at all. A server sends one connection's messages in
    /// order, so a connection that already has a later round missed this one for good,
    /// while one that has neither is still waiting: its server process may lag a round
    /// behind the others.
    fn still_waiting(&self, latest: u64) -> HashMap<u64, (u64, u64)> {
        // A connection waits for round S exactly when S is later than both its opening
        // and its latest round: one sorted list of that bound answers every round.
        let (mut bounds, mut silent) = (Vec::new(), Vec::new());
        for (_, c) in self.clients.iter() {
            if matches!(c.phase, Phase::Open | Phase::Closing) {
                bounds.push(c.opened_us.max(c.last_stamp));
                if c.last_stamp == 0 {
                    silent.push(c.opened_us);
                }
            }
        }
        bounds.sort_unstable();
        silent.sort_unstable();
        let below = |v: &[u64], stamp: u64| v.partition_point(|&b| b < stamp) as u64;
        self.rounds
            .keys()
            .filter(|&&stamp| stamp < latest)
            .map(|&stamp| (stamp, (below(&bounds, stamp), below(&silent, stamp))))
            .collect()
    }

    /// Refreshes the cumulative snapshot: rounds with their expected deliveries.
    fn update_snapshot(&mut self, start: Instant) {
        self.snap.elapsed_secs = start.elapsed().as_secs_f64();
        if let Some(shared) = &self.config.rounds_elsewhere {
            let stamps = std::mem::take(&mut *shared.lock().unwrap_or_else(|e| e.into_inner()));
            for stamp in stamps {
                // A round none of ours received: delivered to none of them.
                self.rounds.entry(stamp).or_default();
            }
        }
        let latest = self.rounds.keys().copied().max().unwrap_or(0);
        let second_latest = self
            .rounds
            .keys()
            .copied()
            .filter(|&s| s < latest)
            .max()
            .unwrap_or(0);
        let waiting = match &self.waiting_at_end {
            Some(frozen) => frozen.clone(),
            None => self.still_waiting(latest),
        };
        if let Some(positions) = &self.positions {
            self.snap.recovery = positions.stats.clone();
        }
        let now_us = wall_us();
        for (&stamp, acc) in &self.rounds {
            let opened_before = self.open_times.partition_point(|&t| t < stamp) as u64;
            let ended_without = self
                .ended
                .iter()
                .filter(|&&(o, last)| o < stamp && last < stamp)
                .count() as u64;
            let expected = opened_before - ended_without;
            self.snap.rounds.insert(
                stamp,
                Round {
                    delivered: acc.delivered,
                    expected,
                    delivered_expected: acc.delivered_expected,
                    first_us: acc.first_us,
                    last_us: acc.last_us,
                    // Over when everyone expected got it; or when nobody can get it any
                    // more: every expected connection that lacks it has received a later
                    // round (see `still_waiting`), or has received nothing at all while
                    // two later rounds went out and this one's deliveries stopped a while
                    // ago (a server that skips some connections altogether). A round
                    // still on its way when the run ends (a fan-out longer than the
                    // interval, a server process lagging a round behind) is cut off, not
                    // missed.
                    complete: acc.delivered_expected >= expected
                        || match waiting.get(&stamp) {
                            None => false, // the latest round
                            Some(&(0, _)) => true,
                            Some(&(all, silent)) => {
                                all == silent
                                    && stamp < second_latest
                                    && now_us.saturating_sub(acc.last_us) >= ROUND_QUIET_US
                            }
                        },
                },
            );
        }
    }
}

/// Where [`record_message`] counts: the worker's fields, borrowed apart from its
/// connections.
struct Tally<'a> {
    snap: &'a mut Snapshot,
    rounds: &'a mut HashMap<u64, RoundAcc>,
    done: &'a mut usize,
    target_messages: Option<u64>,
    positions: Option<&'a mut Positions>,
    /// `--pusher-channel`: the protocol's own messages are not publications, and a
    /// signed subscription goes out when the socket id comes.
    pusher: Option<&'a crate::pusher::PusherPlan>,
}

/// Whether a message is one of the Pusher protocol's own (`pusher:…`,
/// `pusher_internal:…`: connection, subscription, pong), not a publication.
/// They are small; key order varies by server, so the event is looked for anywhere.
fn is_pusher_protocol_message(payload: &[u8]) -> bool {
    const EVENT: &[u8] = br#""event":"pusher"#;
    payload.len() < 1024 && payload.windows(EVENT.len()).any(|w| w == EVENT)
}

/// How the server answered a Pusher subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SubscriptionAnswer {
    Succeeded,
    Refused,
}

/// The subscription answer a Pusher protocol message is, if it is one
/// (`pusher_internal:subscription_succeeded` or `pusher:subscription_error`).
fn subscription_answer(payload: &[u8]) -> Option<SubscriptionAnswer> {
    const SUCCEEDED: &[u8] = b"pusher_internal:subscription_succeeded";
    const REFUSED: &[u8] = b"pusher:subscription_error";
    let has = |needle: &[u8]| payload.windows(needle.len()).any(|w| w == needle);
    if has(SUCCEEDED) {
        Some(SubscriptionAnswer::Succeeded)
    } else if has(REFUSED) {
        Some(SubscriptionAnswer::Refused)
    } else {
        None
    }
}

/// Measures one complete message received by `client`.
fn record_message(tally: &mut Tally, client: &mut Client, payload: &[u8], now_us: u64) {
    let Tally {
        snap,
        rounds,
        done,
        target_messages,
        positions,
        pusher,
    } = tally;
    // With --recover, envelopes are checked against the connection's positions, and
    // the answers to its resumes are not publications at all.
    let seen = match positions.as_deref_mut() {
        Some(positions) => positions.on_message(client.index, payload, stamp_of_value),
        None => Seen::Other,
    };
    if let Some(plan) = pusher.filter(|plan| plan.signs()) {
        if let Some(socket_id) = crate::pusher::socket_id(payload) {
            let subscribe = plan.subscribe(client.index as usize, Some(&socket_id));
            client.send_text(subscribe.as_bytes());
            return;
        }
    }
    if pusher.is_some() && is_pusher_protocol_message(payload) {
        if let Some(answer) = subscription_answer(payload).filter(|_| !client.subscribed) {
            client.subscribed = true;
            if answer == SubscriptionAnswer::Refused {
                *snap
                    .errors
                    .entry("pusher subscription refused".into())
                    .or_default() += 1;
            }
            if *target_messages == Some(0) && matches!(client.phase, Phase::Open) {
                **done += 1;
            }
        }
        return;
    }
    if seen == Seen::Answer {
        return;
    }
    snap.messages += 1;
    client.received += 1;
    if *target_messages == Some(client.received) && matches!(client.phase, Phase::Open) {
        **done += 1;
    }
    let stamp = match seen {
        Seen::Publication { stamp } => stamp,
        _ => stamp_micros(payload),
    };
    let Some(stamp) = stamp else {
        snap.unparsable += 1;
        return;
    };
    client.last_stamp = client.last_stamp.max(stamp);
    let latency = match now_us.checked_sub(stamp) {
        Some(l) => l,
        None => {
            snap.clock_skew += 1;
            0
        }
    };
    match positions.as_deref_mut() {
        // Sent by a recovery: its wait is the time the connection was away, not a
        // delivery latency.
        Some(positions) if stamp < client.opened_us => positions.stats.replayed += 1,
        // Values above the histogram's range are clamped to its top.
        _ => {
            let _ = snap.latency.record(latency.clamp(1, MAX_LATENCY_US));
        }
    }
    let round = rounds.entry(stamp).or_default();
    if round.delivered == 0 {
        round.first_us = now_us;
    }
    round.delivered += 1;
    round.last_us = round.last_us.max(now_us);
    if client.opened_us < stamp {
        round.delivered_expected += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_after_is_never_cut_short_and_spread_by_at_most_a_fifth() {
        for secs in [0u64, 1, 2, 5, 30] {
            let asked = Duration::from_secs(secs);
            for _ in 0..50 {
                let d = after_retry_after(asked);
                let most = asked + (asked / 5).min(Duration::from_secs(1));
                assert!(d >= asked && d <= most, "{asked:?}: {d:?}");
            }
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        for attempt in 0..20 {
            let step = BACKOFF_BASE
                .saturating_mul(1 << attempt.min(16))
                .min(BACKOFF_CAP);
            for _ in 0..50 {
                let d = backoff(attempt);
                assert!(
                    d >= step / 2 && d <= step,
                    "attempt {attempt}: {d:?} vs step {step:?}"
                );
            }
        }
        assert_eq!(BACKOFF_CAP, Duration::from_secs(10));
    }
}
