//! Every connection of this process, and what is indexed by it: the slab, the topics'
//! subscriber lists, the handshake and closing deadlines, sockets per client address
//! and token expiry times.
//!
//! One owner for all of it because they must change together: a connection leaving
//! the open phase leaves its topics, a removed connection leaves every index. The
//! invariants kept here:
//! - only open connections are in topics (`Topics` relies on it);
//! - `stats.open` is the number of open connections;
//! - a deadline queue entry whose connection moved on is dropped, never acted on
//!   (entries are matched by slab key *and* deadline, since keys are reused).
//!
//! Timeouts need no timer per connection: every handshake gets the same time limit,
//! so deadlines are pushed in order and kept in a FIFO (likewise for closing
//! connections); [`Registry::expire`] pops the expired ones.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use c1m_proto::CloseCode;
use mio::net::TcpStream;
use mio::{Interest, Registry as MioRegistry, Token};
use slab::Slab;

use crate::app_connections::AppConnections;
use crate::connection::{Connection, End, Limits, Next, PhaseKind, SendError};
use crate::counters::Counters;
use crate::per_ip::PerIp;
use crate::topics::{TopicId, Topics};

/// Close code for a connection whose token expired (see [`Registry::expire_tokens`]):
/// in the private-use range (4000–4999), so a client can tell it from other closes
/// and reconnect with a fresh token.
pub const TOKEN_EXPIRED: CloseCode = CloseCode(4001);

pub struct Registry {
    pub conns: Slab<Connection>,
    pub topics: Topics,
    pub counters: Counters,
    pub limits: Limits,
    handshake_timeout: Duration,
    close_timeout: Duration,
    /// Sockets per client address, when `--max-connections-per-ip` is set.
    per_ip: Option<PerIp>,
    /// Open Pusher connections per app (the node's: a worker's is shared).
    pub app_connections: AppConnections,
    /// (slab key, deadline) of connections in the handshake or waiting for an HTTP
    /// answer, oldest first.
    handshake_deadlines: VecDeque<(usize, Instant)>,
    /// (slab key, deadline) of closing connections, oldest first.
    closing_deadlines: VecDeque<(usize, Instant)>,
    /// Connections whose input was not drained in their last turn.
    pub read_again: Vec<usize>,
    /// Topics that got their first (`true`) or lost their last (`false`) local
    /// subscriber since the owner last took them (the cluster follows them).
    interest_changes: Vec<(String, bool)>,
    /// Pusher sockets that left a presence channel (unsubscribed or gone), as
    /// (channel, key), in order: the owner takes them before its next join and at the
    /// end of each turn (see `server/pusher_clients.rs`), so a key reused in the same
    /// turn never has its join undone by its predecessor's leave.
    presence_left: Vec<(String, usize)>,
    /// The user id each Pusher socket joined each presence topic as (client events on
    /// presence channels carry it), by (key, topic): kept here so that it goes when
    /// the subscription goes, while the topic's id still names it.
    presence_users: HashMap<(u32, TopicId), serde_json::Value>,
    /// `exp` (Unix seconds) of each open connection admitted with a token that has one.
    token_expiry: HashMap<usize, u64>,
    /// A worker's resumes waiting for the master's history, by request id: the
    /// connection's key and the topic. Removing the connection drops its entries,
    /// so an answer never reaches a later owner of the key.
    pub resumes: HashMap<u32, (usize, String, u64)>,
    pub next_resume: u32,
    /// Resumed clients waiting to join a topic (see `server/resume.rs`), as (key,
    /// topic, the offset they have): dropped with their connection.
    pub pending_joins: Vec<(usize, String, u64)>,
}

impl Registry {
    pub fn new(
        limits: Limits,
        handshake_timeout: Duration,
        close_timeout: Duration,
        per_ip: Option<PerIp>,
    ) -> Registry {
        Registry {
            conns: Slab::new(),
            topics: Topics::default(),
            counters: Counters::default(),
            limits,
            handshake_timeout,
            close_timeout,
            per_ip,
            app_connections: AppConnections::local(),
            handshake_deadlines: VecDeque::new(),
            closing_deadlines: VecDeque::new(),
            read_again: Vec::new(),
            interest_changes: Vec::new(),
            presence_left: Vec::new(),
            presence_users: HashMap::new(),
            token_expiry: HashMap::new(),
            resumes: HashMap::new(),
            next_resume: 0,
            pending_joins: Vec::new(),
        }
    }

    /// Adds an accepted socket, in the handshake phase under the handshake timeout.
    pub fn register(
        &mut self,
        registry: &MioRegistry,
        mut stream: TcpStream,
        peer: SocketAddr,
        tls: Option<c1m_proto::tls_lean::LeanTls>,
        now: Instant,
    ) -> io::Result<usize> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        registry.register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let deadline = now + self.handshake_timeout;
        self.counters.tls_handshaking += usize::from(tls.is_some());
        entry.insert(Connection::new(stream, deadline, tls));
        if let Some(per_ip) = self.per_ip.as_mut() {
            per_ip.add(key, peer.ip());
        }
        self.handshake_deadlines.push_back((key, deadline));
        self.counters.accepted += 1;
        Ok(key)
    }

    /// Whether the socket at `key` is within `--max-connections-per-ip`.
    pub fn within_ip_limit(&self, key: usize) -> bool {
        self.per_ip.as_ref().is_none_or(|p| p.within_limit(key))
    }

    /// Bookkeeping after a connection handled an event: phase counters, topics,
    /// deadlines, removal.
    pub fn after(&mut self, key: usize, before: PhaseKind, next: Next) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        let after = conn.kind();
        // Count phase changes first, even for a connection about to be removed: one read
        // can upgrade a connection and then find EOF, and `remove` uncounts open ones.
        if before != after && after == PhaseKind::Open {
            self.counters.open += 1;
            if let Some(app) = conn.pusher_app() {
                self.app_connections.opened(app);
            }
        }
        if before == PhaseKind::Open && after != PhaseKind::Open {
            self.counters.open -= 1;
            if let Some(app) = conn.pusher_app() {
                self.app_connections.closed(app);
            }
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
            self.unsubscribe_all(key);
            self.token_expiry.remove(&key);
        }
        if after == PhaseKind::Closing {
            let conn = &mut self.conns[key];
            conn.settle_closing();
            if let Some(deadline) = conn.deadline() {
                self.closing_deadlines.push_back((key, deadline));
            }
        }
    }

    /// Drops a connection and its every index entry, closing the socket.
    ///
    /// The socket is not deregistered first: closing its only descriptor takes it out
    /// of the epoll set (the process accepted it itself, close-on-exec, and never
    /// duplicates it; worker processes are started with exec, not forked from a process
    /// holding clients), and an `EPOLL_CTL_DEL` per close was 6 % of the machine's CPU
    /// when half a million clients vanished at once (BENCHMARKS.md, "Storms"). Events
    /// already fetched for the key in this turn find a vacant or reused slot, which
    /// every handler tolerates (a read that would block).
    pub fn remove(&mut self, key: usize, end: End) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if conn.tls_handshaking() {
            self.counters.tls_handshaking -= 1;
        }
        if conn.kind() == PhaseKind::Open {
            self.counters.open -= 1;
            if let Some(app) = conn.pusher_app() {
                self.app_connections.closed(app);
            }
        }
        self.unsubscribe_all(key);
        self.token_expiry.remove(&key);
        if !self.resumes.is_empty() {
            self.resumes.retain(|_, (owner, ..)| *owner != key);
        }
        self.pending_joins.retain(|(owner, ..)| *owner != key);
        if let Some(per_ip) = self.per_ip.as_mut() {
            per_ip.remove(key);
        }
        match end {
            End::SlowConsumer => self.counters.slow_consumers += 1,
            End::Io => self.counters.io_errors += 1,
            End::PeerClosed => self.counters.peer_closed += 1,
        }
        drop(self.conns.remove(key));
    }

    /// Joins `key` to topic `name` (creating the topic).
    pub fn subscribe(&mut self, key: usize, name: &str) {
        if self.topics.id(name).is_none() {
            self.interest_changes.push((name.to_string(), true));
        }
        let id = self.topics.get_or_create(name);
        let sub = self.topics.add(id, key);
        self.conns[key].add_subscription(sub);
    }

    pub fn unsubscribe(&mut self, key: usize, topic: TopicId) {
        let Some(sub) = self.conns[key].take_subscription(topic) else {
            return;
        };
        let name = self.topics.name(topic).to_string();
        let channel = crate::pusher::channel_of(&name);
        if channel.starts_with(crate::pusher::PRESENCE_PREFIX) && self.conns[key].is_pusher() {
            self.presence_left.push((name.clone(), key));
            self.presence_users.remove(&(key as u32, topic));
        }
        if let Some(moved) = self.topics.remove(sub) {
            self.conns[moved].move_subscription(sub.topic, sub.position);
        }
        if self.topics.id(&name).is_none() {
            self.interest_changes.push((name, false)); // its last local subscriber left
        }
    }

    fn unsubscribe_all(&mut self, key: usize) {
        let topics: Vec<TopicId> = self.conns[key].subscriptions().map(|s| s.topic).collect();
        for topic in topics {
            self.unsubscribe(key, topic);
        }
    }

    /// Topics that gained their first or lost their last subscriber since last asked.
    pub fn take_interest_changes(&mut self) -> Vec<(String, bool)> {
        std::mem::take(&mut self.interest_changes)
    }

    /// Presence channels left since last asked, as (topic, key), in order.
    pub fn take_presence_left(&mut self) -> Vec<(String, usize)> {
        std::mem::take(&mut self.presence_left)
    }

    /// Socket `key`, subscribed to presence topic `topic`, joined it as `user_id` (the
    /// first join counts: a socket stays who it joined as).
    pub fn set_presence_user(&mut self, key: usize, topic: &str, user_id: &serde_json::Value) {
        if let Some(id) = self.topics.id(topic) {
            self.presence_users
                .entry((key as u32, id))
                .or_insert_with(|| user_id.clone());
        }
    }

    /// The user id socket `key` joined presence topic `topic` as, if it did.
    pub fn presence_user(&self, key: usize, topic: &str) -> Option<&serde_json::Value> {
        let id = self.topics.id(topic)?;
        self.presence_users.get(&(key as u32, id))
    }

    /// Forgets the leave of `key` from `topic` (a join that never made it into a
    /// presence table).
    pub fn forget_presence_left(&mut self, topic: &str, key: usize) {
        self.presence_left
            .retain(|(t, k)| !(t == topic && *k == key));
    }

    /// Records (or forgets) when the token of open connection `key` expires.
    pub fn set_token_expiry(&mut self, key: usize, exp: Option<u64>) {
        match exp {
            Some(exp) => self.token_expiry.insert(key, exp),
            None => self.token_expiry.remove(&key),
        };
    }

    /// Closes (with [`TOKEN_EXPIRED`]) every open connection whose token expired before
    /// `now_unix`. One pass over the connections that have a token, every second: no
    /// timer per connection.
    pub fn expire_tokens(&mut self, now_unix: u64, now: Instant) {
        let expired: Vec<usize> = self
            .token_expiry
            .iter()
            .filter(|(_, &exp)| exp < now_unix)
            .map(|(&key, _)| key)
            .collect();
        for key in expired {
            self.token_expiry.remove(&key);
            self.close_open(key, TOKEN_EXPIRED, "token expired", now);
        }
    }

    /// Sends an HTTP answer on connection `key`, keeping the connection for the next
    /// request when the client asked (see `Connection::answer_http`); a kept connection
    /// waits for it under the handshake timeout.
    pub fn answer_http(
        &mut self,
        key: usize,
        response: Vec<u8>,
        keep_alive: bool,
        now: Instant,
    ) -> Next {
        let idle = now + self.handshake_timeout;
        let closing = now + self.close_timeout;
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

    /// Starts the close handshake of an open connection (code and reason to the peer);
    /// the close timeout bounds the wait for its answer.
    pub fn close_open(&mut self, key: usize, code: CloseCode, reason: &str, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.kind() != PhaseKind::Open {
            return;
        }
        let next = conn.begin_close(code, reason, now + self.close_timeout, &self.limits);
        self.after(key, PhaseKind::Open, next);
    }

    /// Ends a connection that failed during a fan-out: a slow consumer is told why with
    /// close code 1008 (its close frame waits behind the queued output, and the close
    /// timeout bounds the wait); a broken socket is dropped.
    pub fn end_failed(&mut self, key: usize, end: End, now: Instant) {
        let Some(conn) = self.conns.get(key) else {
            return;
        };
        if end != End::SlowConsumer || conn.kind() != PhaseKind::Open {
            return self.remove(key, end);
        }
        self.counters.slow_consumers += 1;
        self.close_open(
            key,
            CloseCode::POLICY,
            "slow consumer: output queue full",
            now,
        );
    }

    /// The idle sweep: a connection heard from since the last sweep is fine; a silent
    /// one gets `ping` (if any), and one silent for `idle_sweeps` sweeps is closed with
    /// 1001 (a Pusher client with 4201, its protocol's "pong reply not received"). One
    /// pass over the slab replaces a timer per connection; the ping frame is encoded
    /// once and shared.
    pub fn sweep(&mut self, ping: Option<&bytes::Bytes>, idle_sweeps: Option<u8>, now: Instant) {
        let mut idle = Vec::new();
        let mut failed = Vec::new();
        let mut pings = 0u64;
        for (key, conn) in self.conns.iter_mut() {
            if conn.kind() != PhaseKind::Open {
                continue;
            }
            if conn.is_sse() {
                // Its client never speaks: no idle timeout, a comment line instead of
                // a ping (it keeps proxies from closing the stream, and a dead peer
                // shows as a write error).
                let heartbeat = bytes::Bytes::from_static(crate::sse::HEARTBEAT);
                match conn.send(&heartbeat, &self.limits) {
                    Ok(()) | Err(SendError::Overflow) => {}
                    Err(SendError::Io(_)) => failed.push(key),
                }
                continue;
            }
            let silent = conn.sweep();
            if silent == 0 {
                continue;
            }
            if idle_sweeps.is_some_and(|limit| silent >= limit) {
                idle.push(key);
            } else if let Some(ping) = ping {
                match conn.send(ping, &self.limits) {
                    Ok(()) => pings += 1,
                    Err(SendError::Overflow) => {} // it has output queued: no ping needed
                    Err(SendError::Io(_)) => failed.push(key),
                }
            }
        }
        for key in failed {
            self.remove(key, End::Io);
        }
        for &key in &idle {
            // A Pusher client is told in its protocol's words (4201: reconnect at once).
            let (code, reason) = if self.conns[key].is_pusher() {
                (
                    CloseCode(crate::pusher::code::PONG_TIMEOUT),
                    "Pong reply not received",
                )
            } else {
                (CloseCode::GOING_AWAY, "idle timeout")
            };
            self.close_open(key, code, reason, now);
        }
        self.counters.idle_timeouts += idle.len() as u64;
        tracing::debug!(pings, idle = idle.len(), "idle sweep");
    }

    /// Closes connections whose handshake, HTTP answer or close handshake took too long.
    ///
    /// Entries whose connection has moved on (upgraded, closed, or its slot reused) are
    /// dropped from the front as soon as they are seen, not when their deadline comes:
    /// under heavy churn the queues would otherwise hold one entry per connection accepted
    /// in the last `--handshake-timeout`.
    pub fn expire(&mut self, now: Instant) {
        let mut expired = Vec::new();
        pop_expired(
            &mut self.handshake_deadlines,
            &self.conns,
            &[PhaseKind::Handshake, PhaseKind::Http],
            now,
            &mut expired,
        );
        self.counters.handshake_timeouts += expired.len() as u64;
        for key in expired.drain(..) {
            if self.conns[key].tls_handshaking() {
                self.counters
                    .count_tls_failure(crate::counters::TlsFailure::HandshakeTimeout);
            }
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

    /// The earliest deadline in either queue.
    pub fn next_deadline(&self) -> Option<Instant> {
        let handshake = self.handshake_deadlines.front().map(|&(_, at)| at);
        let closing = self.closing_deadlines.front().map(|&(_, at)| at);
        handshake.into_iter().chain(closing).min()
    }

    /// Shutdown: every open connection gets close 1001, sockets still in the handshake
    /// are dropped, closing ones finish.
    pub fn close_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.conns.iter().map(|(key, _)| key).collect();
        for key in keys {
            match self.conns[key].kind() {
                // Pusher clients are told to come back at once (4200, what pusher-js
                // reconnects on without backoff): a restart, not an end.
                PhaseKind::Open if self.conns[key].is_pusher() => {
                    let code = CloseCode(crate::pusher::code::RECONNECT);
                    self.close_open(key, code, "server restarting: reconnect", now)
                }
                PhaseKind::Open => {
                    self.close_open(key, CloseCode::GOING_AWAY, "server shutting down", now)
                }
                PhaseKind::Handshake | PhaseKind::Http => self.remove(key, End::PeerClosed),
                PhaseKind::Closing => {}
            }
        }
    }
}

/// Pops the front of a deadline queue of connections in one of the phases `kinds`:
/// entries whose connection has moved on (left the phase, or its slot was reused with
/// another deadline) at once, live ones once due, whose keys go to `expired`.
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
