//! What one server process counts (connections, messages, errors), and its periodic
//! stats line. A worker also copies them to its scoreboard slot (see `scoreboard`).

use std::time::{Duration, Instant};

/// What the server counts. Plain integers: the event loop is single-threaded.
#[derive(Debug, Default)]
pub struct Counters {
    pub accepted: u64,
    /// Connections upgraded and receiving broadcasts now.
    pub open: usize,
    /// Frames handed to the kernel or queued for it by publications.
    pub frames_out: u64,
    /// Bytes of those frames.
    pub bytes_out: u64,
    pub broadcasts: u64,
    /// Time from the stamp to the last connection's write in the latest broadcast.
    pub last_fanout: Duration,
    pub messages_in: u64,
    pub protocol_errors: u64,
    pub handshake_rejects: u64,
    pub handshake_timeouts: u64,
    pub plain_http: u64,
    /// Server-Sent Events streams opened (`GET /sse`; they count in `open` too).
    pub sse_opened: u64,
    /// Pusher clients upgraded (`/app/{key}`, a known key or not).
    pub pusher_opened: u64,
    /// Events taken by the Pusher HTTP API (one per event and channel).
    pub pusher_api_events: u64,
    /// Pusher HTTP API requests refused (signature, app, body).
    pub pusher_api_refused: u64,
    /// Pusher subscriptions refused (bad name, bad signature, not served).
    pub pusher_subscriptions_refused: u64,
    /// Pusher sockets that joined a presence channel (signature and data checked).
    pub pusher_presence_joins: u64,
    /// Pusher sockets signed in as a user (`pusher:signin`).
    pub pusher_signins: u64,
    /// Pusher connections closed by the app (`terminate_connections`).
    pub pusher_terminated: u64,
    /// Pusher connections refused with 4004: their app was at its `max_connections`.
    pub pusher_over_quota: u64,
    /// Client events (`client-*`) passed on to a channel's other subscribers.
    pub pusher_client_events: u64,
    /// Client events refused (not enabled, wrong channel, rate limit, size).
    pub pusher_client_events_refused: u64,
    /// Connections closed for falling behind (`--slow-consumer disconnect`).
    pub slow_consumers: u64,
    /// Messages skipped for slow consumers (`--slow-consumer drop`).
    pub dropped: u64,
    /// Connections closed by `--idle-timeout`.
    pub idle_timeouts: u64,
    /// Connections the peer closed (with or without a close handshake).
    pub peer_closed: u64,
    /// Upgrades refused with 503 because `--max-connections` was reached.
    pub rejected_full: u64,
    /// Upgrades refused with 429 by `--max-connections-per-ip`.
    pub rejected_per_ip: u64,
    /// Upgrades refused with 503 by `--max-accept-rate`.
    pub rejected_rate: u64,
    /// Clock ticks not sent because a newer one was queued behind them (a worker that
    /// was busy longer than the interval sends only the newest).
    pub ticks_coalesced: u64,
    /// Local `POST /publish` refused with 503 because the fan-out queue was full.
    pub publishes_refused_busy: u64,
    /// Publications being fanned out or waiting for it, now (a gauge).
    pub publications_queued: u64,
    pub io_errors: u64,
    /// Subscribes with a position that got their missed publications.
    pub recoveries: u64,
    /// Clients keeping positions closed with 1013 because their worker was skipped for
    /// a publication of their topic (they resume and recover it).
    pub resumes_forced: u64,
    /// Subscribes with a position told to reload, by `NotRecovered` reason (in the
    /// order of `NotRecovered::ALL`).
    pub not_recovered: [u64; 6],
    /// TLS handshakes completed (`wss://`, HTTPS), and how many of them resumed a
    /// session with a ticket.
    pub tls_handshakes: u64,
    pub tls_resumed: u64,
    /// TLS sessions in their handshake now (a gauge; see `--max-tls-handshakes`).
    pub tls_handshaking: usize,
    /// TLS connections that failed, by cause (in the order of `TlsFailure::ALL`).
    pub tls_failures: [u64; TlsFailure::ALL.len()],
    /// Values at the previous stats line, to print rates.
    last_line: Option<(Instant, u64)>,
}

/// Why a TLS connection failed (`c1m_tls_failures_total{cause}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The handshake was refused: not TLS at all, no common version or cipher suite,
    /// a malformed or out-of-order message.
    Handshake,
    /// The client sent a fatal alert (e.g. it does not trust our certificate).
    Alert,
    /// The client closed or reset the connection before the handshake was over.
    ClosedInHandshake,
    /// The handshake (TLS and upgrade) was not over within `--handshake-timeout`.
    HandshakeTimeout,
    /// After the handshake: a record that did not decrypt or did not parse, or a bad
    /// key update.
    BadRecord,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 5] = [
        TlsFailure::Handshake,
        TlsFailure::Alert,
        TlsFailure::ClosedInHandshake,
        TlsFailure::HandshakeTimeout,
        TlsFailure::BadRecord,
    ];

    /// The cause's label in `/metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Handshake => "handshake",
            TlsFailure::Alert => "alert",
            TlsFailure::ClosedInHandshake => "closed_in_handshake",
            TlsFailure::HandshakeTimeout => "handshake_timeout",
            TlsFailure::BadRecord => "bad_record",
        }
    }

    /// The cause of a session error, `established` telling whether the handshake was
    /// over when it came.
    pub fn of(error: &c1m_proto::tls_lean::TlsError, established: bool) -> TlsFailure {
        use c1m_proto::tls_lean::TlsError;
        match error {
            TlsError::Alert(_) | TlsError::Handshake(rustls::Error::AlertReceived(_)) => {
                TlsFailure::Alert
            }
            _ if !established => TlsFailure::Handshake,
            _ => TlsFailure::BadRecord,
        }
    }
}

impl Counters {
    pub fn count_tls_failure(&mut self, failure: TlsFailure) {
        self.tls_failures[failure as usize] += 1;
    }

    pub fn count_not_recovered(&mut self, reason: crate::history::NotRecovered) {
        self.not_recovered[reason as usize] += 1;
    }

    /// Logs one stats line: connections, output rate, memory.
    pub fn log_line(&mut self, now: Instant, connections: usize) {
        let rate = match self.last_line {
            Some((at, frames)) if now > at => {
                (self.frames_out - frames) as f64 / (now - at).as_secs_f64()
            }
            _ => 0.0,
        };
        self.last_line = Some((now, self.frames_out));
        tracing::info!(
            open = self.open,
            sockets = connections,
            msgs_out_per_s = format_args!("{rate:.0}"),
            broadcasts = self.broadcasts,
            last_fanout_ms = format_args!("{:.1}", self.last_fanout.as_secs_f64() * 1e3),
            rss_mib = format_args!("{:.1}", rss_bytes().unwrap_or(0) as f64 / (1 << 20) as f64),
            protocol_errors = self.protocol_errors,
            slow_consumers = self.slow_consumers,
            dropped = self.dropped,
            idle_timeouts = self.idle_timeouts,
            "stats"
        );
    }
}

/// Resident set size of this process, from `/proc/self/statm` (Linux only).
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions; it returns -1 for unknown names only.
    let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page_size).ok()?)
}
