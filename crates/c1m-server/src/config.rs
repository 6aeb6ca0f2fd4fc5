//! Settings of `c1m serve`. The CLI fills this struct; the server reads nothing else.

use std::net::SocketAddr;
use std::time::Duration;

pub use crate::auth::{JwtConfig, JwtKey};
pub use crate::broker::BrokerUrl;
pub use crate::connection::SlowConsumerPolicy;
pub use crate::tls::TlsFiles;

/// Unit of the timestamp the clock broadcast carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// Milliseconds since the Unix epoch (the seed's format).
    Millis,
    /// Microseconds since the Unix epoch.
    Micros,
}

/// Everything a server needs to know to run.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    /// Address to listen on; port 0 picks a free port (printed at start-up).
    pub listen: SocketAddr,
    /// Wait this long after start-up before the first broadcast.
    pub delay: Duration,
    /// Time between two broadcasts.
    pub interval: Duration,
    /// Start broadcasting only once this many connections are open (then keep going).
    pub total: Option<usize>,
    /// Hold connections but never broadcast.
    pub connect_only: bool,
    pub precision: Precision,
    /// Largest message a client may send; larger ones are closed with 1009.
    pub max_message_size: u64,
    /// Largest amount of output a connection may have queued in user space; past it the
    /// client is a slow consumer and `slow_consumer` applies.
    pub max_pending_bytes: usize,
    /// `SO_SNDBUF` for each connection (the kernel doubles it); `None` leaves the
    /// kernel's autotuning on, which lets one stalled client hold up to
    /// `net.ipv4.tcp_wmem`'s maximum (4 MiB by default) of kernel memory.
    pub send_buffer: Option<usize>,
    /// What to do with a slow consumer.
    pub slow_consumer: SlowConsumerPolicy,
    /// Ping connections that were silent for this long (none when `None`).
    pub ping_interval: Option<Duration>,
    /// Close connections silent for this long (never when `None`).
    pub idle_timeout: Option<Duration>,
    /// Key of the publish API (`Authorization: Bearer KEY`); the API is off without it.
    pub api_key: Option<String>,
    /// When set, upgrades must carry one of these `Origin`s (`*` allows any).
    pub allowed_origins: Option<Vec<String>>,
    /// When set, upgrades must carry a valid token.
    pub jwt: Option<JwtConfig>,
    /// Most topics one connection may be in.
    pub max_topics_per_connection: usize,
    /// Serve `wss://` with this certificate and key (re-read on SIGHUP).
    pub tls: Option<TlsFiles>,
    /// Join a cluster over this broker: publishes reach every node's subscribers.
    pub broker: Option<BrokerUrl>,
    /// A client must complete its upgrade request within this time.
    pub handshake_timeout: Duration,
    /// TLS handshakes one process runs at once; past it, it stops accepting.
    pub max_tls_handshakes: usize,
    /// Largest HTTP request head accepted (431 beyond).
    pub max_head_bytes: usize,
    /// How long a closing connection may take to finish the close handshake.
    pub close_timeout: Duration,
    /// Time between two stats lines on stderr.
    pub stats_interval: Duration,
    /// Listen backlog asked of the kernel (capped by `net.core.somaxconn`).
    pub backlog: i32,
    /// Echo every client data message back (for conformance testing; off by default).
    pub echo: bool,
    /// Accept permessage-deflate (without context takeover) when a client offers it.
    pub deflate: bool,
    /// Most upgraded connections the whole server (all workers) accepts; further
    /// upgrades get HTTP 503.
    pub max_connections: Option<u64>,
    /// Most sockets one client address may hold in one process; upgrades past it get 429.
    pub max_connections_per_ip: Option<u32>,
    /// Upgrades admitted per second by the whole node; past it 503 + Retry-After.
    pub max_accept_rate: Option<u32>,
    /// Most sockets one process holds (keep it under the process's `nofile` limit); a
    /// full process stops accepting and leaves new connections to other workers.
    pub max_sockets: usize,
    /// Set `SO_REUSEPORT`, so several independent server processes can share the port
    /// (the kernel spreads connections among them by hash, regardless of their load).
    pub reuse_port: bool,
    /// Connections a broadcast is written to per turn of the event loop (see
    /// `fanout::Broadcast`).
    pub fanout_slice: usize,
    /// Topic history (`--history-*`): what each topic keeps for clients that come back.
    pub history: crate::history::Policy,
    /// Pusher apps served on `/app/{key}` and `/apps/{id}/…` (`--pusher-app`), each
    /// with its options (`--pusher-client-events` and `--pusher-webhook` folded in).
    /// The first app's channels are topics as named; the others' are namespaced
    /// (`pusher::topic_of`).
    pub pusher_apps: Vec<crate::pusher::App>,
    /// Deliberate faults, for testing the measuring instrument (`c1m bench`) only.
    pub faults: Faults,
}

/// Faults a test can inject to check that `c1m bench` notices them. All off by default.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Stamp broadcasts this far in the past (the bench must see this much latency).
    pub stamp_offset: Duration,
    /// Skip every Nth open connection in each broadcast (the bench must count misses).
    pub skip_every: Option<usize>,
    /// Skip every connection from this address in each broadcast (a bench worker whose
    /// connections all come from it must count every round as missed).
    pub skip_source: Option<std::net::IpAddr>,
    /// Wait this long between two slices of a broadcast.
    pub slice_pause: Option<Duration>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8088)),
            delay: Duration::from_secs(0),
            interval: Duration::from_secs(60),
            total: None,
            connect_only: false,
            precision: Precision::Millis,
            max_message_size: 1 << 20,
            max_pending_bytes: 256 * 1024,
            send_buffer: None,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            ping_interval: None,
            idle_timeout: None,
            api_key: None,
            allowed_origins: None,
            jwt: None,
            max_topics_per_connection: 64,
            tls: None,
            broker: None,
            handshake_timeout: Duration::from_secs(10),
            max_tls_handshakes: 128,
            max_head_bytes: 8 * 1024,
            close_timeout: Duration::from_secs(3),
            stats_interval: Duration::from_secs(10),
            backlog: 65535,
            reuse_port: false,
            echo: false,
            deflate: false,
            max_connections: None,
            max_connections_per_ip: None,
            max_accept_rate: None,
            max_sockets: 1 << 20,
            fanout_slice: 1024,
            history: crate::history::Policy::default(),
            pusher_apps: Vec::new(),
            faults: Faults::default(),
        }
    }
}
