//! The c1m push server.
//!
//! One worker is one thread running one `mio` event loop over a slab of compact
//! connection states (see `ARCHITECTURE.md` for why not a task per connection). The
//! pieces, each in its own module:
//!
//! - [`config`]: every setting of `c1m serve`, in one typed struct.
//! - [`clock`]: when to broadcast and what (the seed's time push), stamped once.
//! - [`topics`]: which connections a publication goes to.
//! - [`connection`]: one client: handshake, frame decoding, bounded pending output.
//! - [`auth`]: who may connect to which topics (origin, JWT), and the publish API key.
//! - [`commands`]: the client's subscribe/unsubscribe text protocol.
//! - [`http`]: plain HTTP on the same port: publish API, metrics, health checks.
//! - [`metrics`]: the Prometheus text for `GET /metrics`.
//! - [`node_stats`]: the node's and the cluster's numbers for `GET /stats`.
//! - [`control`]: the messages between the master and its workers.
//! - [`broker`]: the cluster link to NATS or Redis (one per node).
//! - [`publish_acks`]: delivery counts of a publish through the cluster.
//! - [`tls`]: `wss://` with rustls: certificate loading, non-blocking session I/O.
//! - [`outbox`]: the bytes a connection could not write yet.
//! - [`per_ip`]: sockets per client address, for `--max-connections-per-ip`.
//! - [`server`]: the event loop: accept, read, fan out, time out, shut down.
//! - [`stats`]: counters and the periodic stats line.
//! - [`master`]: the supervisor of a multi-process server (`--workers N`).
//! - [`scoreboard`]: per-worker counters in shared memory.

pub mod auth;
pub mod broker;
pub mod clock;
pub mod commands;
pub mod config;
pub mod connection;
pub mod control;
pub mod http;
pub mod master;
pub mod metrics;
pub mod node_stats;
pub mod outbox;
pub mod per_ip;
pub mod publish_acks;
pub mod scoreboard;
pub mod server;
pub mod stats;
pub mod tls;
pub mod topics;

pub use config::{
    BrokerUrl, Faults, JwtConfig, JwtKey, Precision, ServeConfig, SlowConsumerPolicy, TlsFiles,
};
pub use server::{run, run_worker, ServeError, WorkerRole};
