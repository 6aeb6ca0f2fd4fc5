//! The c1m load generator and measuring instrument.
//!
//! - [`target`]: the URL to load and the source addresses to load it from.
//! - [`worker`]: one process's event loop of client connections.
//! - [`tls`]: the TLS client settings for `wss://` targets.
//! - [`payload`]: timestamps out of message payloads.
//! - [`recovery`]: `--recover`'s positions across reconnects, and what they prove.
//! - [`snapshot`]: cumulative, mergeable measurements (HdrHistogram, rounds, errors).
//! - [`meter`]: Dropwizard-style rates (mean, 1/5/15-minute EWMA).
//! - [`report`]: the console report and the JSON result.
//! - [`summary`]: the headline numbers of a result (`c1m report summary`).
//! - [`html`]: the self-contained HTML report (`c1m report html`), drawn with [`svg`].

pub mod html;
pub mod meter;
pub mod payload;
pub mod pusher;
pub mod recovery;
pub mod report;
pub mod snapshot;
pub mod summary;
pub mod svg;
pub mod target;
pub mod tls;
pub mod worker;
