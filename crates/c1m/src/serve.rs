//! `c1m serve`: command-line flags of the push server, turned into a `ServeConfig`.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use c1m_server::{Faults, Precision, ServeConfig};
use clap::{Args, ValueEnum};

#[derive(Args, Debug)]
#[command(after_help = "Examples:
  c1m serve                                  # seed defaults: port 8088, push every minute
  c1m serve --interval 1s                    # push the clock every second
  c1m serve --delay 10m --total 1200000      # the seed's run: wait, then push once 1.2M are connected
  c1m serve --connect-only                   # hold connections, push nothing
  c1m serve --listen 127.0.0.1:0             # pick a free port (printed on stdout)")]
pub struct ServeArgs {
    /// Address and port to listen on (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "0.0.0.0:8088", env = "C1M_LISTEN")]
    listen: SocketAddr,

    /// Wait this long after start-up before the first broadcast (e.g. 10m, 30s, 0).
    #[arg(long, default_value = "0s", value_parser = parse_duration, env = "C1M_DELAY")]
    delay: Duration,

    /// Time between broadcasts of the clock (e.g. 1m, 1s, 250ms).
    #[arg(long, default_value = "1m", value_parser = parse_positive_duration, env = "C1M_INTERVAL")]
    interval: Duration,

    /// Start broadcasting only once this many connections are open; once reached,
    /// broadcasting continues even if connections drop.
    #[arg(long, value_name = "N", env = "C1M_TOTAL")]
    total: Option<usize>,

    /// Hold connections but never broadcast.
    #[arg(long, env = "C1M_CONNECT_ONLY")]
    connect_only: bool,

    /// Unit of the broadcast timestamp: milliseconds (seed format) or microseconds since the epoch.
    #[arg(long, value_enum, default_value = "ms", env = "C1M_PRECISION")]
    precision: PrecisionArg,

    /// Largest message a client may send, in bytes; larger messages are closed with 1009.
    #[arg(long, default_value_t = 1 << 20, value_name = "BYTES", env = "C1M_MAX_MESSAGE_SIZE")]
    max_message_size: u64,

    /// Most output bytes queued for one connection that stopped reading; past this the
    /// connection is dropped as a slow consumer, so it can never hold up the others.
    #[arg(long, default_value_t = 256 * 1024, value_name = "BYTES", env = "C1M_MAX_PENDING_BYTES")]
    max_pending_bytes: usize,

    /// A client must finish its upgrade request within this time.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, env = "C1M_HANDSHAKE_TIMEOUT")]
    handshake_timeout: Duration,

    /// Time between stats lines on stderr.
    #[arg(long, default_value = "10s", value_parser = parse_positive_duration, env = "C1M_STATS_INTERVAL")]
    stats_interval: Duration,

    /// On shutdown, wait this long for clients to answer the close frame.
    #[arg(long, default_value = "3s", value_parser = parse_duration, env = "C1M_CLOSE_TIMEOUT")]
    close_timeout: Duration,

    /// Set SO_REUSEPORT so several `c1m serve` processes can share one port; the kernel
    /// spreads connections among them by hash. Each process broadcasts on its own clock.
    #[arg(long, env = "C1M_REUSE_PORT")]
    reuse_port: bool,

    /// Test fault: stamp broadcasts this far in the past (checks the bench's latency).
    #[arg(long, hide = true, default_value = "0s", value_parser = parse_duration)]
    fault_stamp_offset: Duration,

    /// Test fault: skip every Nth connection in each broadcast (checks miss detection).
    #[arg(long, hide = true)]
    fault_skip_every: Option<usize>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum PrecisionArg {
    /// Milliseconds since the Unix epoch.
    Ms,
    /// Microseconds since the Unix epoch.
    Us,
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = ServeConfig {
        listen: args.listen,
        delay: args.delay,
        interval: args.interval,
        total: args.total,
        connect_only: args.connect_only,
        precision: match args.precision {
            PrecisionArg::Ms => Precision::Millis,
            PrecisionArg::Us => Precision::Micros,
        },
        max_message_size: args.max_message_size,
        max_pending_bytes: args.max_pending_bytes,
        handshake_timeout: args.handshake_timeout,
        close_timeout: args.close_timeout,
        stats_interval: args.stats_interval,
        reuse_port: args.reuse_port,
        faults: Faults {
            stamp_offset: args.fault_stamp_offset,
            skip_every: args.fault_skip_every.filter(|&n| n > 0),
        },
        ..ServeConfig::default()
    };
    c1m_server::run(config, |addr| {
        // Machine-readable: scripts and tests read the port from this line.
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "listening on {addr}");
        let _ = stdout.flush();
    })
    .context("c1m serve")
}

/// Parses a human duration such as `250ms`, `10s` or `1m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (expected e.g. 250ms, 10s, 1m)"))
}

fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be greater than zero".into()),
        d => Ok(d),
    }
}
