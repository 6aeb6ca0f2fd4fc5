//! The c1m push server.
//!
//! One worker is one thread running one `mio` event loop over a slab of compact
//! connection states (see `ARCHITECTURE.md` for why not a task per connection). The
//! pieces, each in its own module:
//!
//! - [`config`]: every setting of `c1m serve`, in one typed struct.
//! - [`clock`]: when to broadcast and what (the seed's time push), stamped once.
//! - [`connection`]: one client: handshake, frame decoding, bounded pending output.
//! - [`outbox`]: the bytes a connection could not write yet.
//! - [`server`]: the event loop: accept, read, fan out, time out, shut down.
//! - [`stats`]: counters and the periodic stats line.
//! - [`master`]: the supervisor of a multi-process server (`--workers N`).
//! - [`scoreboard`]: per-worker counters in shared memory.

pub mod clock;
pub mod config;
pub mod connection;
pub mod master;
pub mod outbox;
pub mod scoreboard;
pub mod server;
pub mod stats;

pub use config::{Faults, Precision, ServeConfig};
pub use server::{run, run_worker, ServeError, WorkerRole};
