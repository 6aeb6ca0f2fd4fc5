//! The c1m push server.
//!
//! One worker is one thread running one `mio` event loop over a slab of compact
//! connection states (see `ARCHITECTURE.md` for why not a task per connection). The
//! pieces, each in its own module:
//!
//! - [`config`]: every setting of `c1m serve`, in one typed struct.
//! - [`target`]: where a publication goes and what came of it.
//! - [`clock`]: when to broadcast and what (the seed's time push), stamped once.
//! - [`topics`]: which connections a publication goes to.
//! - [`connection`]: one client: handshake, frame decoding, bounded pending output.
//! - [`admission`]: `--max-accept-rate`, upgrades per second for the whole node.
//! - [`auth`]: who may connect to which topics (origin, JWT), and the publish API key.
//! - [`commands`]: the client's subscribe/unsubscribe text protocol.
//! - [`http`]: plain HTTP on the same port: publish API, metrics, health checks.
//! - [`sse`]: Server-Sent Events, the topics as a `text/event-stream`.
//! - [`metrics`]: the Prometheus text for `GET /metrics`.
//! - [`node_stats`]: the node's and the cluster's numbers for `GET /stats`.
//! - [`control`]: the messages between the master and its workers.
//! - [`broker`]: the cluster link to NATS or Redis (one per node).
//! - [`publish_acks`]: delivery counts of a publish through the cluster.
//! - [`tls`]: `wss://` with rustls: certificate loading, non-blocking session I/O.
//! - [`outbox`]: the bytes a connection could not write yet.
//! - [`per_ip`]: sockets per client address, for `--max-connections-per-ip`.
//! - [`server`]: the event loop of one process and its dispatch.
//! - [`listener`]: accepting, and leaving the listener to other workers when full.
//! - [`registry`]: the connections and everything indexed by them (topics,
//!   deadlines, per-address counts, token expiry).
//! - [`fanout`]: the hot path, one frame to many connections.
//! - [`upstream`]: where publications come from: local, via the master, via the broker.
//! - [`cluster`]: a node's cluster membership, shared by single process and master.
//! - [`cluster_copy`]: a node's copy of the broker's history, and resumes from it.
//! - [`counters`]: what one process counts, and its periodic stats line.
//! - [`master`]: the supervisor of a multi-process server (`--workers N`).
//! - [`scoreboard`]: per-worker counters in shared memory.

pub mod admission;
pub mod app_connections;
pub mod auth;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod cluster_copy;
pub mod cluster_presence;
pub mod commands;
pub mod config;
pub mod connection;
pub mod control;
pub mod counters;
pub mod envelope;
pub mod fanout;
pub mod history;
pub mod http;
pub mod listener;
pub mod master;
pub mod metrics;
pub mod node_stats;
pub mod outbox;
pub mod per_ip;
pub mod presence;
pub mod publish_acks;
pub mod pusher;
pub mod pusher_api;
pub mod registry;
pub mod scoreboard;
pub mod server;
pub mod sse;
pub mod target;
pub mod tickets;
pub mod tls;
pub mod topics;
pub mod upstream;
pub mod webhooks;

pub use config::{
    BrokerUrl, Faults, JwtConfig, JwtKey, Precision, ServeConfig, SlowConsumerPolicy, TlsFiles,
};
pub use server::{run, run_worker, ServeError, WorkerRole};
